"""Where sparsity applies: a :class:`Layout` (``[groups, rows, cols]`` view) per weight, and a model's :class:`Site` list."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ... import ir
from ...runtime import taps
from ...errors import unknown_name
from .options import MIN_SIZE


# ---------------------------------------------------------------- layouts and sites

@dataclass(frozen=True)
class Layout:
    """A weight as ``[groups, rows, cols]``: reshape to ``pre``, transpose by ``perm``, reshape to ``mat``."""

    shape: tuple[int, ...]
    pre: tuple[int, ...]
    perm: tuple[int, ...]
    mat: tuple[int, int, int]
    block_len: int  # length of the innermost input axis (where N:M blocks live)

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.pre).transpose(self.perm).reshape(self.mat)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        mid = tuple(self.pre[i] for i in self.perm)
        return m.reshape(mid).transpose(np.argsort(self.perm)).reshape(self.shape)


def _conv_layout(shape, attrs) -> Layout:
    o, i, k = shape[0], shape[1], shape[2:]
    g = attrs["group"]
    nd = len(k)
    return Layout(tuple(shape), (g, o // g, i, *k), (0, 1, *range(3, 3 + nd), 2),
                  (g, o // g, int(np.prod(k)) * i), i)


def _conv_transpose_layout(shape, attrs) -> Layout:
    cin, o, k = shape[0], shape[1], shape[2:]
    g = attrs["group"]
    nd = len(k)
    return Layout(tuple(shape), (g, cin // g, o, *k), (0, 2, *range(3, 3 + nd), 1),
                  (g, o * int(np.prod(k)), cin // g), cin // g)


def _gemm_layout(shape, attrs) -> Layout:
    if attrs.get("transB", 0):
        n, k = shape
        return Layout(tuple(shape), (1, n, k), (0, 1, 2), (1, n, k), k)
    k, n = shape
    return Layout(tuple(shape), (1, k, n), (0, 2, 1), (1, n, k), k)


def _conv_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    a = site.attrs
    p = taps.conv_patches(x, a["kernel_shape"], a["strides"], a["pads"], a["dilations"], a["group"],
                               a["auto_pad"])
    g, s, _ = p.shape
    i, kk = site.layout.block_len, int(np.prod(a["kernel_shape"]))
    return p.reshape(g, s, i, kk).transpose(0, 1, 3, 2).reshape(g, s, kk * i)


def _conv_transpose_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    g = site.layout.mat[0]
    cols = np.moveaxis(x, 1, -1).reshape(-1, g, site.layout.block_len)
    return cols.transpose(1, 0, 2)


def _gemm_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    if site.attrs.get("transA", 0):
        x = x.T
    return x.reshape(1, -1, site.layout.block_len)


def _node_attrs(node: onnx.NodeProto, shape) -> dict:
    if node.op_type in ("Conv", "ConvTranspose"):
        return taps.conv_attrs(node, shape)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# op -> (weight rank check, layout, calibration samples [G, S, cols] from the op's input 0)
OP_RULES: dict[str, tuple[Callable[[Sequence[int]], bool], Callable, Callable]] = {
    "Conv": (lambda s: len(s) >= 3, _conv_layout, _conv_samples),
    "ConvTranspose": (lambda s: len(s) >= 3, _conv_transpose_layout, _conv_transpose_samples),
    "Gemm": (lambda s: len(s) == 2, _gemm_layout, _gemm_samples),
    "MatMul": (lambda s: len(s) == 2, _gemm_layout, _gemm_samples),
}


@dataclass
class Site:
    """One weight tensor and the layer(s) that read it."""

    tensor: str
    name: str  # first consumer node
    op: str
    layout: Layout
    attrs: dict
    input: str  # activation fed to the first consumer
    consumers: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.layout.shape))

    def samples(self, x: np.ndarray) -> np.ndarray:
        return OP_RULES[self.op][2](x, self)


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_sites(proto: onnx.ModelProto, *, min_size: int = MIN_SIZE, ignore: Iterable[str] = ()
               ) -> tuple[list[Site], list[dict]]:
    """Weight tensors eligible for sparsity or sharing, and the skipped ones with a reason."""
    inits = {t.name: t for t in proto.graph.initializer}
    ignore = set(ignore)
    sites: dict[str, Site] = {}
    skipped: list[dict] = []
    for idx, node in enumerate(proto.graph.node):
        if node.op_type not in OP_RULES or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name, tname = node_label(node, idx), node.input[1]
        if tname in sites:
            if sites[tname] is not None:
                sites[tname].consumers.append(name)
            continue
        t = inits[tname]
        shape = list(t.dims)
        rank_ok, make_layout, _ = OP_RULES[node.op_type]
        reason = None
        if name in ignore or tname in ignore:
            reason = "ignored"
        elif t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            reason = "not a float tensor"
        elif not rank_ok(shape):
            reason = f"{node.op_type} weight of rank {len(shape)} not supported"
        elif int(np.prod(shape)) < min_size:
            reason = f"{int(np.prod(shape))} weights < min size {min_size}"
        if reason:
            skipped.append({"name": name, "tensor": tname, "reason": reason})
            sites[tname] = None  # type: ignore[assignment]  # seen; later consumers ignored too
            continue
        attrs = _node_attrs(node, shape)
        sites[tname] = Site(tname, name, node.op_type, make_layout(shape, attrs), attrs, node.input[0], [name])
    known = {n.name for n in proto.graph.node} | set(inits) | {s["name"] for s in skipped} | \
        {c for s in sites.values() if s is not None for c in s.consumers}
    for name in sorted(ignore - known):  # a typo would otherwise leave a layer the user meant to protect
        raise unknown_name("ignore", name, known)
    return [s for s in sites.values() if s is not None], skipped


def weights_as_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with ``Constant`` nodes lifted to initializers (unchanged if it has none)."""
    if not any(n.op_type == "Constant" for n in proto.graph.node):
        return proto
    return ir.from_graph(ir.to_graph(proto), proto)


def set_initializers(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose named initializers hold new values (same names, dtypes, shapes)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arrays[t.name]).astype(ir.np_dtype(t.data_type)), t.name))
    return out


def initializer_arrays(proto: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    names = set(names)
    return {t.name: ir.tensor_to_array(t) for t in proto.graph.initializer if t.name in names}
