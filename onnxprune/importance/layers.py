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

from dataclasses import dataclass

import numpy as np
import onnx

from .. import calibrate
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
    w: np.ndarray                 # dense: [out, K] as applied to x rows; conv: the ONNX weight
    conv: dict | None = None

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
        if self.kind == "dense":
            return self.w.T
        if self.kind == "conv_t":
            return self.w.reshape(self.w.shape[0], -1)
        g = self.groups
        cout, cin_g = self.w.shape[:2]
        w = self.w.reshape(g, cout // g, cin_g, -1).transpose(0, 2, 1, 3)
        return w.reshape(g * cin_g, -1)

    def matrix(self) -> np.ndarray:
        """[groups, out per group, D]: the layer applied to Gram rows."""
        if self.kind == "dense":
            return self.w[None]
        g = self.groups
        return self.w.reshape(g, self.w.shape[0] // g, -1)

    def column_channels(self) -> np.ndarray:
        """[groups, D]: group channel (or -1) of every Gram column."""
        if self.kind == "dense":
            return self.x_index[None]
        g = self.groups
        cin_g = self.w.shape[1]
        taps = int(np.prod(self.w.shape[2:]))
        return np.repeat(self.x_index.reshape(g, cin_g), taps, axis=1)


def _dense(node: onnx.NodeProto, m: Member, w: np.ndarray, ctx: ScoreContext):
    """(x input, x channel axis, W as [out, K]) of a Gemm / MatMul whose weight is ``m``."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "Gemm":
        if m.input_index != 1:
            return None
        wm = w.T if not attrs.get("transB", 0) else w
        return node.input[0], (0 if attrs.get("transA", 0) else 1), wm * float(attrs.get("alpha", 1.0))
    if w.ndim != 2:
        return None
    if m.input_index == 1:                      # x @ W: features on x's last axis
        rank = len(ctx.analysis.shapes.get(node.input[0], [])) or 2
        return node.input[0], rank - 1, w.T
    rank = len(ctx.analysis.shapes.get(node.input[1], [])) or 2
    return node.input[1], rank - 2, w           # W @ x: features on x's row axis


def _conv(node: onnx.NodeProto, m: Member, w: np.ndarray, ctx: ScoreContext):
    if m.input_index != 1:
        return None
    return node.input[0], 1, w


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
        w = np.asarray(ctx.value(m.tensor), dtype=np.float64)
        got = fn(node, m, w, ctx)
        if got is None:
            continue
        x, axis, wm = got
        conv = calibrate.conv_attrs(node, w.shape) if kind != "dense" else None
        if kind == "conv" and conv["group"] > 1:
            width = None                     # W's input axis is per conv group: only an activation member maps it
        elif kind == "dense":
            width = wm.shape[1]
        else:
            width = w.shape[0] if kind == "conv_t" else w.shape[1]
        idx = _x_index(group, m, x, axis, width)
        if idx is None:
            continue
        layers.append(Layer(node, kind, x, axis, np.asarray(idx, dtype=np.int64), wm, conv))
    memo[group.id] = layers
    return layers


def to_channels(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """Sum per-position ``values`` into the group's channels (positions with index -1 are dropped)."""
    keep = index >= 0
    return np.bincount(index[keep], weights=np.asarray(values, dtype=np.float64)[keep], minlength=size)[:size]
