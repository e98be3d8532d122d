"""Calibration criteria from first-order activation statistics.

On the group's activation tensors: mean |x| (``act-mean``), the average
percentage of zeros after a ReLU-like op (``apoz``), the entropy of the
per-sample channel means (``entropy``, Luo & Wu 2017). On the inputs of its consumer layers,
weighted by the consumer's weights: Wanda (``|W|·‖X‖``) and FLAP's fluctuation
(``Var(X)·‖W‖²``).
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxPruneError
from ..groups import ACTIVATION, Group, Member
from .base import Criterion
from .context import ScoreContext
from .layers import consumer_layers, to_channels
from .stats import Needs, TensorStats

# producers after which "x <= 0" means "the unit is off"
RELU_LIKE = ("Relu", "Clip", "LeakyRelu", "PRelu", "ThresholdedRelu", "Elu", "Selu", "Celu", "HardSwish",
             "Gelu", "Shrink")


def _activations(group: Group, relu_only: bool = False) -> list[Member]:
    return [m for m in group.of_kind(ACTIVATION) if not relu_only or m.op in RELU_LIKE]


def _layer_inputs(group: Group, ctx: ScoreContext) -> list[Member]:
    """The activations the consumer layers read (what the next layers see); all activations if none."""
    xs = {(la.x, la.x_axis) for la in consumer_layers(group, ctx)}
    acts = _activations(group)
    return [m for m in acts if (m.tensor, m.axis) in xs] or acts


def _stats_for(ctx: ScoreContext, tensor: str, axis: int, index: np.ndarray, hist: bool = False) -> TensorStats:
    st = ctx.tensor_stats(tensor, axis, hist)
    if len(st.count) != len(index):
        raise OnnxPruneError(
            f"tensor '{tensor}' has {len(st.count)} positions on axis {axis} with the calibration data, the "
            f"analysis expected {len(index)}; give --input-shape matching the data")
    return st


def _per_channel(values: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``values`` over the positions of each channel."""
    n = to_channels(np.ones(len(index)), index, size)
    return to_channels(values, index, size) / np.maximum(n, 1)


def _plan_members(members, hist: bool = False):
    if not members:
        return None
    keys = {(m.tensor, m.axis) for m in members}
    return Needs(moments=keys, hist=keys if hist else set())


def _act_mean(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    out = []
    for m in _layer_inputs(group, ctx):
        st = _stats_for(ctx, m.tensor, m.axis, m.index)
        out.append(to_channels(st.abs_sum, m.index, group.size) / np.maximum(
            to_channels(st.count, m.index, group.size), 1))
    return out


def _apoz(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    """1 - APoZ (Hu et al. 2016), so that higher = keep."""
    out = []
    for m in _activations(group, relu_only=True):
        st = _stats_for(ctx, m.tensor, m.axis, m.index)
        off = to_channels(st.nonpos, m.index, group.size) / np.maximum(to_channels(st.count, m.index, group.size), 1)
        out.append(1.0 - off)
    return out


def _producer_input(ctx: ScoreContext, tensor: str) -> str | None:
    """The data input of the node that produces ``tensor``."""
    memo = ctx.cache.setdefault("producer_input", None)
    if memo is None:
        memo = ctx.cache["producer_input"] = {o: n.input[0] for n in ctx.proto.graph.node if n.input
                                               for o in n.output}
    return memo.get(tensor)


def _pooled_inputs(group: Group, ctx: ScoreContext) -> list[Member]:
    """The layer inputs, where a member with several positions per channel (a Flatten of a spatial
    map) is replaced by the one-position-per-channel activation it was made from, if the group has
    it: Luo & Wu's entropy is of each channel's pooled value, not an average over its positions."""
    out = []
    for m in _layer_inputs(group, ctx):
        if (m.index >= 0).sum() > len(np.unique(m.index[m.index >= 0])):
            src = _producer_input(ctx, m.tensor)
            m = next((a for a in _activations(group) if a.tensor == src and len(a.index) == group.size), m)
        out.append(m)
    return list({(m.tensor, m.axis): m for m in out}.values())


def _entropy(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    return [_per_channel(_stats_for(ctx, m.tensor, m.axis, m.index, hist=True).entropy(), m.index, group.size)
            for m in _pooled_inputs(group, ctx)]


def _plan_layers(group: Group, ctx: ScoreContext) -> Needs | None:
    layers = consumer_layers(group, ctx)
    return Needs(moments={(la.x, la.x_axis) for la in layers}) if layers else None


def _wanda(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    """Σ |W_ij|·‖X_j‖ over each consumer's input columns of a channel (Sun et al. 2024)."""
    out = []
    for la in consumer_layers(group, ctx):
        st = _stats_for(ctx, la.x, la.x_axis, la.x_index)
        out.append(to_channels(np.abs(la.columns()).sum(axis=1) * np.sqrt(st.sumsq), la.x_index, group.size))
    return out


def _fluctuation(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    """Var(X_j)·‖W_:,j‖² summed over a channel's input columns (FLAP, An et al. 2024)."""
    out = []
    for la in consumer_layers(group, ctx):
        st = _stats_for(ctx, la.x, la.x_axis, la.x_index)
        cols = la.columns()
        out.append(to_channels(st.var * (cols * cols).sum(axis=1), la.x_index, group.size))
    return out


CRITERIA = [
    Criterion("act-mean", lambda g, c: _plan_members(_layer_inputs(g, c)), _act_mean, requires_data=True,
              fallback="l2", summary="mean |activation|"),
    Criterion("apoz", lambda g, c: _plan_members(_activations(g, relu_only=True)), _apoz, requires_data=True,
              fallback="act-mean", summary="1 - fraction of zeros after ReLU-like ops"),
    Criterion("entropy", lambda g, c: _plan_members(_pooled_inputs(g, c), hist=True), _entropy, requires_data=True,
              fallback="act-mean", summary="entropy of per-sample channel means"),
    Criterion("wanda", _plan_layers, _wanda, requires_data=True, fallback="act-mean",
              summary="|W|·‖X‖ over consumer input columns"),
    Criterion("fluctuation", _plan_layers, _fluctuation, requires_data=True, fallback="act-mean",
              summary="Var(X)·‖W‖² over consumer input columns (FLAP)"),
]
