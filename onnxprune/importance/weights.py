"""Weight criteria: magnitude (l1, l2, LAMP), FPGM, BatchNorm scale, and a seeded random baseline.

Every coupled layer counts: ``weight_out`` rows of the producing layers,
``weight_in`` columns of the consuming layers (several positions of one channel
— a Flatten, a depthwise multiplier — are summed), and, for the magnitude
criteria, the scale of normalisation layers on the group.
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxPruneError
from ..groups import PARAM, WEIGHT_IN, WEIGHT_OUT, Group, Member
from .base import Criterion
from .context import ScoreContext
from .layers import to_channels
from .stats import Needs

# normalisation ops whose scale is a per-channel weight: op -> input index of the scale
NORM_SCALE = {"BatchNormalization": 1, "InstanceNormalization": 1, "LayerNormalization": 1,
              "GroupNormalization": 1}


def weight_members(group: Group, ctx: ScoreContext, norms: bool = True) -> list[Member]:
    """Members whose constant weights a magnitude criterion reads (norm scales only with ``norms``)."""
    out = []
    for m in group.members:
        is_weight = m.kind in (WEIGHT_OUT, WEIGHT_IN)
        is_scale = norms and m.kind == PARAM and NORM_SCALE.get(m.op) == m.input_index
        if (is_weight or is_scale) and ctx.is_constant(m.tensor):
            shape = ctx.shape(m.tensor)
            if len(shape) > m.axis and shape[m.axis] == len(m.index):
                out.append(m)
    return out


def weight_rows(group: Group, ctx: ScoreContext, norms: bool = True):
    """(member, rows) per weight member: ``rows[p]`` = the weights at position ``p`` of its axis, in the
    weight's own dtype and, where possible, a view (:func:`row_sums` reduces them in float64)."""
    for m in weight_members(group, ctx, norms):
        w = ctx.value(m.tensor)
        yield m, np.moveaxis(w, m.axis, 0).reshape(w.shape[m.axis], -1)


def row_sums(rows: np.ndarray, fn, block_bytes: int = 2**18) -> np.ndarray:
    """``fn(rows as float64).sum(axis=1)``, a block of rows at a time, without a float64 copy of the whole
    weight. The blocks keep the rows' memory layout (``astype`` order K), so numpy sums in the same
    order as it would over the whole float64 weight: the same bits."""
    least = 1 if rows.flags.c_contiguous else 64  # strided rows: enough of them to read memory in runs
    step = max(least, block_bytes // (8 * max(1, rows.shape[1])))
    out = np.empty(rows.shape[0], dtype=np.float64)
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = fn(rows[i:i + step].astype(np.float64)).sum(axis=1)
    return out


def _square(x: np.ndarray) -> np.ndarray:
    return x * x


def _plan_weights(group: Group, ctx: ScoreContext) -> Needs | None:
    return Needs() if weight_members(group, ctx) else None


def _l1(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    return [to_channels(row_sums(r, np.abs), m.index, group.size) for m, r in weight_rows(group, ctx)]


def _sq(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    return [to_channels(row_sums(r, _square), m.index, group.size) for m, r in weight_rows(group, ctx)]


def _l2(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    return [np.sqrt(s) for s in _sq(group, ctx)]


def channel_vectors(rows: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """[size, L']: each channel's weights, its positions' rows concatenated (zero-padded if uneven)."""
    keep = np.nonzero(index >= 0)[0]
    keep = keep[np.argsort(index[keep], kind="stable")]
    counts = np.bincount(index[keep], minlength=size)[:size]
    width = int(counts.max()) if counts.size else 0
    out = np.zeros((size, width, rows.shape[1]), dtype=np.float64)
    slot = np.arange(len(keep)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[index[keep], slot] = rows[keep]
    return out.reshape(size, -1)


def _plan_fpgm(group: Group, ctx: ScoreContext) -> Needs | None:
    return Needs() if weight_members(group, ctx, norms=False) else None


def _fpgm(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    """Sum of Euclidean distances from each channel's weights to every other channel's (He et al. 2019)."""
    out = []
    for m, rows in weight_rows(group, ctx, norms=False):
        v = channel_vectors(rows, m.index, group.size)
        sq = (v * v).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (v @ v.T), 0.0)
        np.fill_diagonal(d2, 0.0)
        out.append(np.sqrt(d2).sum(axis=1))
    return out


def _bn_members(group: Group, ctx: ScoreContext) -> list[Member]:
    return [m for m in group.of_kind(PARAM)
            if m.op == "BatchNormalization" and m.input_index == 1 and ctx.is_constant(m.tensor)]


def _plan_bn(group: Group, ctx: ScoreContext) -> Needs | None:
    """Groups without a BatchNormalization fall back to l2; a model without any BN is an error."""
    if _bn_members(group, ctx):
        return Needs()
    if not any(n.op_type == "BatchNormalization" for n in ctx.proto.graph.node):
        raise OnnxPruneError("criterion bn-scale: the model has no BatchNormalization left (exporters often fold "
                             "it into Conv); use --criterion l2")
    return None


def _bn_scale(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    """|gamma| of each BatchNormalization on the group (network slimming, Liu et al. 2017)."""
    return [to_channels(np.abs(np.asarray(ctx.value(m.tensor), dtype=np.float64)).ravel(), m.index, group.size)
            for m in _bn_members(group, ctx)]


def _random(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    return [np.random.default_rng([ctx.seed, group.id]).random(group.size)]


CRITERIA = [
    Criterion("l1", _plan_weights, _l1, fallback="act-mean", summary="sum of |w| over coupled weights"),
    Criterion("l2", _plan_weights, _l2, fallback="act-mean", summary="Euclidean norm of coupled weights"),
    Criterion("lamp", _plan_weights, _sq, normalize="lamp", fallback="act-mean", summary="LAMP-normalised squared norm"),
    Criterion("fpgm", _plan_fpgm, _fpgm, fallback="l2", summary="distance to the other channels (geometric median)"),
    Criterion("bn-scale", _plan_bn, _bn_scale, fallback="l2", summary="|gamma| of BatchNormalization"),
    Criterion("random", lambda g, c: Needs(), _random, normalize="none", summary="seeded random baseline"),
]
