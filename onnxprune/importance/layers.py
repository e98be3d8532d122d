"""Consumer layers of a group seen as matrices: which weights multiply which input positions.

A *consumer* is a layer with a ``weight_in`` member: its data input carries the
group's channels. :class:`Layer` gives, in one place for Conv, ConvTranspose,
Gemm and MatMul, what the data-aware criteria need:

* ``columns()`` — for every position of the input's channel axis, the weights
  that multiply it (all outputs and kernel taps), as rows of a 2-D array;
* ``matrix()`` / ``column_channels()`` — the layer as ``[groups, out, D]``
  acting on Gram rows (im2col rows for Conv) and the group channel of each of
  the ``D`` columns, for OBS and LASSO (not for ConvTranspose).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from ..runtime.taps import conv_attrs
from ..groups import ACTIVATION, WEIGHT_IN, Group, Member
from .context import ScoreContext
from .stats import GramSpec


@dataclass
class Layer:
    node: onnx.NodeProto
    kind: str                     # "conv", "conv_t", "dense"
    x: str                        # data input tensor
    x_axis: int
    x_index: np.ndarray           # position of x's channel axis -> group channel or -1
    weight: str                   # the constant weight tensor
    ctx: ScoreContext = field(repr=False)
    transform: Callable[[np.ndarray], np.ndarray] = lambda w: w
    conv: dict | None = None

    @property
    def w(self) -> np.ndarray:
        """dense: [out, K] as applied to x rows; conv: the ONNX weight (float64, made on demand)."""
        return self.transform(np.asarray(self.ctx.value(self.weight), dtype=np.float64))

    @property
    def key(self) -> str:
        """Statistics key: a node's first output is unique in a graph."""
        return self.node.output[0]

    @property
    def groups(self) -> int:
        return self.conv["group"] if self.conv else 1

    @property
    def gram_spec(self) -> GramSpec | None:
        if self.kind == "conv_t":
            return None
        conv = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.conv.items())) \
            if self.conv else None
        return GramSpec(self.x, self.x_axis, conv)

    def columns(self) -> np.ndarray:
        """[positions of x's channel axis, R]: every weight that multiplies each input position."""
        w = self.w
        if self.kind == "dense":
            return w.T
        if self.kind == "conv_t":
            return w.reshape(w.shape[0], -1)
        g = self.groups
        cout, cin_g = w.shape[:2]
        return w.reshape(g, cout // g, cin_g, -1).transpose(0, 2, 1, 3).reshape(g * cin_g, -1)

    def matrix(self) -> np.ndarray:
        """[groups, out per group, D]: the layer applied to Gram rows."""
        w = self.w
        return w[None] if self.kind == "dense" else w.reshape(self.groups, w.shape[0] // self.groups, -1)

    def column_channels(self) -> np.ndarray:
        """[groups, D]: group channel (or -1) of every Gram column."""
        if self.kind == "dense":
            return self.x_index[None]
        shape = np.shape(self.ctx.value(self.weight))
        taps = int(np.prod(shape[2:]))
        return np.repeat(self.x_index.reshape(self.groups, shape[1]), taps, axis=1)


def _dense(node: onnx.NodeProto, m: Member, shape: tuple, ctx: ScoreContext):
    """(x input, x channel axis, W -> [out, K], K) of a Gemm / MatMul whose weight is ``m``."""
    if len(shape) != 2:
        return None
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if m.input_index != 1:
            return None
        alpha, trans_b = float(attrs.get("alpha", 1.0)), bool(attrs.get("transB", 0))
        return (node.input[0], 1 - int(bool(attrs.get("transA", 0))),
                lambda w: (w if trans_b else w.T) * alpha, shape[1] if trans_b else shape[0])
    if m.input_index == 1:                      # x @ W: features on x's last axis
        rank = len(ctx.analysis.shapes.get(node.input[0], [])) or 2
        return node.input[0], rank - 1, np.transpose, shape[0]
    rank = len(ctx.analysis.shapes.get(node.input[1], [])) or 2
    return node.input[1], rank - 2, None, shape[1]     # W @ x: features on x's row axis


def _conv(node: onnx.NodeProto, m: Member, shape: tuple, ctx: ScoreContext):
    if m.input_index != 1:
        return None
    if node.op_type == "ConvTranspose":
        return node.input[0], 1, None, shape[0]
    grouped = conv_attrs(node, shape)["group"] > 1
    # a grouped conv's W input axis is per conv group: only an activation member maps it
    return node.input[0], 1, None, None if grouped else shape[1]


_RULES = {"Conv": ("conv", _conv), "ConvTranspose": ("conv_t", _conv), "Gemm": ("dense", _dense),
          "MatMul": ("dense", _dense)}


def _x_index(group: Group, m: Member, x: str, axis: int, width: int | None) -> np.ndarray | None:
    for a in group.of_kind(ACTIVATION):
        if a.tensor == x and a.axis == axis:
            return a.index
    if width is not None and len(m.index) == width:
        return m.index
    return None


def consumer_layers(group: Group, ctx: ScoreContext) -> list[Layer]:
    """Every weight_in member of ``group`` whose layer has a constant weight and a known input mapping."""
    memo = ctx.cache.setdefault("layers", {})
    if group.id in memo:
        return memo[group.id]
    layers = []
    for m in group.of_kind(WEIGHT_IN):
        rule = _RULES.get(m.op)
        node = ctx.node(m.node, m.tensor, m.input_index)
        if rule is None or node is None or not ctx.is_constant(m.tensor):
            continue
        kind, fn = rule
        shape = np.shape(ctx.value(m.tensor))
        got = fn(node, m, shape, ctx)
        if got is None:
            continue
        x, axis, transform, width = got
        idx = _x_index(group, m, x, axis, width)
        if idx is None:
            continue
        conv = conv_attrs(node, shape) if kind != "dense" else None
        layers.append(Layer(node, kind, x, axis, np.asarray(idx, dtype=np.int64), m.tensor, ctx,
                            transform or (lambda w: w), conv))
    memo[group.id] = layers
    return layers


def to_channels(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """Sum per-position ``values`` into the group's channels (positions with index -1 are dropped)."""
    keep = index >= 0
    return np.bincount(index[keep], weights=np.asarray(values, dtype=np.float64)[keep], minlength=size)[:size]
