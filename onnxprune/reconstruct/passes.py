"""Passes over the calibration data: which refits share one, and running original and pruned side by side.

A refit's input must reflect the refits upstream of it, so refits are ordered by
*dependency level* (how many refit layers lie on the longest path before them in
the pruned graph): refits of one level never feed each other and can share one pass.
Every pass runs a model only as far as the tensors it taps (onnxruntime itself
executes the whole graph whatever outputs are fetched).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir, runtime
from ..data import ArrayData, fit_empty

Progress = Callable[[Iterable, int, str], Iterable]


def levels(graph: gs.Graph, names: set[str]) -> dict[str, int]:
    """Dependency level of each node in ``names`` within the topologically sorted ``graph``."""
    depth: dict[str, int] = {}
    out: dict[str, int] = {}
    for node in graph.nodes:
        d = max((depth.get(t.name, 0) for t in node.inputs), default=0)
        if node.name in names:
            out[node.name] = d
            d += 1
        for t in node.outputs:
            depth[t.name] = d
    return out


def downstream(graph: gs.Graph, names: set[str]) -> set[str]:
    """Names of the nodes that consume, directly or not, an output of a node in ``names``."""
    hit: set[str] = set()
    reached: set[str] = set()
    for node in graph.nodes:
        if any(t.name in hit for t in node.inputs):
            reached.add(node.name)
        if node.name in names or node.name in reached:
            hit.update(t.name for t in node.outputs)
    return reached


def stage_of(level: int, num_levels: int, stages: int | None) -> int:
    """Pass index of a level: one pass per level, or levels merged evenly into ``stages`` passes."""
    if stages is None or stages >= num_levels:
        return level
    return level * stages // num_levels


def _uses(node: onnx.NodeProto) -> Iterator[str]:
    yield from node.input
    for attr in node.attribute:
        for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            for inner in g.node:
                yield from _uses(inner)


def truncate(proto: onnx.ModelProto, outputs: list[str], types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """The part of ``proto`` needed to compute ``outputs``, which become its only outputs."""
    need = set(outputs)
    keep = []
    for node in reversed(proto.graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(_uses(node))
    inits = [t for t in proto.graph.initializer if t.name in need]
    init_names = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names or i.name in need]
    outs = []
    for name in outputs:
        vi = onnx.ValueInfoProto(name=name)
        if name in types:
            vi.type.tensor_type.elem_type = types[name].tensor_type.elem_type
        outs.append(vi)
    m = onnx.ModelProto(ir_version=proto.ir_version)
    m.opset_import.extend(proto.opset_import)
    m.functions.extend(proto.functions)
    m.graph.CopyFrom(onnx.helper.make_graph(keep[::-1], proto.graph.name, inputs, outs, inits))
    return m


def free_batch(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` (a truncated copy: no value_info, untyped outputs) with a symbolic batch dimension."""
    for vi in proto.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    return proto


class Tapper:
    """Fetches named tensors of one model batch by batch; graph inputs come from the feed.

    ``free``: run with a symbolic batch dimension although the model fixes it (see ``batch_is_free``).
    """

    def __init__(self, proto: onnx.ModelProto, names: list[str], free: bool = False):
        feeds = {i.name for i in proto.graph.input}
        self.declared = {i.name: ir.input_dims(i) for i in proto.graph.input}
        self.names = list(dict.fromkeys(names))
        self.fetch = [n for n in self.names if n not in feeds]
        self.sess = None
        if self.fetch:
            cut = truncate(proto, self.fetch, runtime.tensor_types(proto))
            self.sess = runtime.session(free_batch(cut) if free else cut)

    def __call__(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: fit_empty(v, self.declared.get(k)) for k, v in feed.items()}   # empty KV caches
        got = runtime.run(self.sess, feed, self.fetch) if self.sess is not None else {}
        return {n: got[n] if n in got else feed[n] for n in self.names}


def batch_is_free(proto: onnx.ModelProto, data: ArrayData) -> bool:
    """Whether a model exported with batch 1 computes a batch of 2 as each sample alone.

    Exports often fix the batch to 1 although nothing depends on it; batches then make
    onnxruntime faster. A graph that bakes the batch into a shape fails or differs here.
    """
    feed = next(data.batches(2))
    outs = [o.name for o in proto.graph.output]
    try:
        two = Tapper(proto, outs, free=True)(feed)
    except Exception:   # noqa: BLE001 - any failure means "not free"
        return False
    one = Tapper(proto, outs)
    singles = [one({k: v[i:i + 1] for k, v in feed.items()}) for i in range(2)]
    return all(two[n].shape[0] == 2 and np.allclose(two[n], np.concatenate([s[n] for s in singles]),
                                                    rtol=1e-4, atol=1e-5) for n in outs)


def batches(fit: ArrayData, held: ArrayData, batch_size: int, progress: Progress | None = None,
            description: str = "reconstructing") -> Iterator[tuple[tuple[bool, ...], dict[str, np.ndarray]]]:
    """``(held-out flags, feed)`` for every batch of ``fit`` then ``held``.

    The flags say which sums a batch goes to: ``(False,)`` fit, ``(True,)`` check; with no
    held-out data every fit batch is also the check batch, ``(False, True)``.
    """
    flags = {False: (False,) if held.num_samples else (False, True), True: (True,)}

    def gen():
        for is_held, data in ((False, fit), (True, held)):
            if data.num_samples:
                for feed in data.batches(batch_size):
                    yield flags[is_held], feed

    it: Iterable = gen()
    if progress is not None:
        it = progress(it, num_batches(fit, held, batch_size), description)
    return iter(it)


def num_batches(fit: ArrayData, held: ArrayData, batch_size: int) -> int:
    return sum(-(-d.num_samples // batch_size) for d in (fit, held))
