"""Calibration runs: intermediate tensors tapped as extra onnxruntime outputs, and conv patches.

``tap`` streams batches through a model with the wanted tensors appended as
graph outputs (graph optimisations off, so names survive), in chunks of at
most ``max_outputs`` tensors per pass so memory stays bounded, and hands each
batch's tensors to a visitor that accumulates whatever statistic it needs.

``conv_patches`` turns a Conv input into the im2col matrix whose product with
the reshaped weight is the Conv output, per group: the shared building block
of second-order criteria, least-squares reconstruction and SparseGPT.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx

from .. import runtime
from ..data.readers import ArrayData

Visitor = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


def tap(proto: onnx.ModelProto, tensors: Sequence[str], data: ArrayData, visit: Visitor, *,
        batch_size: int = 32, limit: int | None = None, max_outputs: int = 64,
        progress: Callable[[Iterable, int, str], Iterable] | None = None, description: str = "calibrating"
        ) -> None:
    """Call ``visit(tapped, feed)`` for every batch, where ``tapped`` maps each of ``tensors`` to its value.

    With more than ``max_outputs`` tensors the data is streamed several times, one chunk of
    tensors per pass; ``visit`` then sees each batch once per chunk, each time with that chunk's tensors.
    """
    tensors = list(dict.fromkeys(tensors))
    types = runtime.tensor_types(proto)
    chunks = [tensors[i:i + max_outputs] for i in range(0, len(tensors), max_outputs)] or [[]]
    n = data.num_samples if limit is None else min(limit, data.num_samples)
    steps = len(chunks) * ((n + batch_size - 1) // batch_size)

    def batches():
        for chunk in chunks:
            sess = runtime.session(runtime.with_outputs(proto, chunk, types), optimize=False)
            for feed in data.batches(batch_size, limit):
                yield chunk, sess, feed

    it = batches()
    if progress is not None:
        it = progress(it, steps, description)
    for chunk, sess, feed in it:
        visit(runtime.run(sess, feed, chunk), feed)


def conv_attrs(node: onnx.NodeProto | Mapping, weight_shape: Sequence[int]) -> dict:
    """Kernel, strides, pads, dilations and group of a Conv node with defaults filled in.

    ``node`` is a NodeProto or a mapping of its attributes (a graphsurgeon ``node.attrs``).
    """
    if isinstance(node, Mapping):
        a = dict(node)
    else:
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    k = list(a.get("kernel_shape", weight_shape[2:]))
    nd = len(k)
    pads = list(a.get("pads", [0] * (2 * nd)))
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return {
        "kernel_shape": k,
        "strides": list(a.get("strides", [1] * nd)),
        "pads": pads,
        "dilations": list(a.get("dilations", [1] * nd)),
        "group": int(a.get("group", 1)),
        "auto_pad": auto_pad,
    }


def _same_pads(in_sizes, k, s, d, upper: bool) -> list[int]:
    begin, end = [], []
    for i, size in enumerate(in_sizes):
        out = -(-size // s[i])
        total = max(0, (out - 1) * s[i] + (k[i] - 1) * d[i] + 1 - size)
        lo = total // 2 if upper else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin + end


def conv_patches(x: np.ndarray, kernel_shape, strides, pads, dilations, group: int = 1,
                 auto_pad: str = "NOTSET", rows: np.ndarray | None = None) -> np.ndarray:
    """im2col of ``x`` [N, C, *spatial] -> [group, N * L, C/group * prod(kernel)].

    Columns are ordered (channel, *kernel) like ``W.reshape(Cout, -1)``, so for
    ``Wg = W.reshape(group, Cout/group, -1)`` the Conv output (no bias) of group g
    is ``patches[g] @ Wg[g].T``. ``rows`` (flat indices into the N * L output
    positions, sample-major) keeps only those patches, gathered without building the rest.
    """
    n, c = x.shape[:2]
    nd = x.ndim - 2
    k, s, d = list(kernel_shape), list(strides), list(dilations)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(x.shape[2:], k, s, d, auto_pad == "SAME_UPPER")
    elif auto_pad == "VALID":
        pads = [0] * (2 * nd)
    pad_width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, pad_width) if any(pads) else x
    out_sizes = [(xp.shape[2 + i] - (k[i] - 1) * d[i] - 1) // s[i] + 1 for i in range(nd)]
    # view of shape [N, C, *out, *k]
    st = xp.strides
    shape = (n, c, *out_sizes, *k)
    strides_ = (st[0], st[1], *[st[2 + i] * s[i] for i in range(nd)], *[st[2 + i] * d[i] for i in range(nd)])
    view = np.lib.stride_tricks.as_strided(xp, shape=shape, strides=strides_, writeable=False)
    # -> [N, *out, C, *k]
    order = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    if rows is None:
        cols = view.transpose(order).reshape(n * int(np.prod(out_sizes)), c, int(np.prod(k)))
    else:
        at = np.unravel_index(np.asarray(rows, dtype=np.int64), (n, *out_sizes))
        cols = view.transpose(order)[at].reshape(len(rows), c, int(np.prod(k)))
    cols = cols.reshape(cols.shape[0], group, (c // group) * int(np.prod(k)))
    return np.ascontiguousarray(cols.transpose(1, 0, 2))
