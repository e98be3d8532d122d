"""Normalisations: per-channel ones pass channels and slice their parameters; ones that mix channels freeze them."""

from __future__ import annotations

import numpy as np

from ..groups import PARAM
from . import rule
from .base import NodeCtx, Unsupported


@rule("BatchNormalization", "InstanceNormalization")
def channel_norm(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if len([o for o in ctx.outputs if o.name]) > 1:
        raise Unsupported("training-mode outputs (running statistics) are used")
    if lab is None:
        return
    if ctx.op == "InstanceNormalization" and lab.axis >= 2:  # e.g. GroupNorm(1, C) reshaped to [N, 1, C*H*W]
        ctx.fix(lab.ids, "normalises over the axis that carries the channels, so removing channels changes "
                         "every output")
        return
    if lab.axis == 1:
        for i in range(1, len(ctx.inputs)):
            if ctx.present(i):
                ctx.member(i, 0, lab.ids, PARAM)
    ctx.passthrough(0, 0)


@rule("LayerNormalization")
def layer_norm(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis", -1)) % rank
    if lab.axis >= axis:
        ctx.fix(lab.ids, "normalises over the channel axis, so removing channels changes every output")
        return
    for out in range(len(ctx.outputs)):
        if ctx.outputs[out].name and out == 0:
            ctx.passthrough(0, 0)


@rule("GroupNormalization")
def group_norm(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    if lab.axis != 1:
        ctx.fix(lab.ids, "channels on a spatial axis of GroupNormalization")
        return
    groups = int(ctx.attr("num_groups"))
    k = len(lab.ids) // groups
    reps = np.array([ctx.union_within(lab.ids[g * k:(g + 1) * k]) for g in range(groups)], dtype=np.int64)
    for i in (1, 2):
        p = ctx.const(i)
        if p is None:
            raise Unsupported("scale/bias computed at run time")
        if p.shape[0] == len(lab.ids) and len(lab.ids) > 1:
            ctx.member(i, 0, lab.ids, PARAM)
        elif p.shape[0] == groups and groups > 1:
            ctx.member(i, 0, reps, PARAM)
    out = ctx.outputs[0].name
    node = ctx.node

    def fix(view):
        view.set_attr(node, "num_groups", view.new_size(out) // k)
    ctx.fixup(fix)
    ctx.passthrough(0, 0)


@rule("LRN")
def lrn(ctx: NodeCtx) -> None:
    ctx.unless_over_channels([1], "normalises across neighbouring channels")


@rule("MeanVarianceNormalization")
def mvn(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    axes = [a % ctx.rank(0) for a in ctx.attr("axes", [0, 2, 3])]
    ctx.unless_over_channels(axes, "normalises over the channel axis")
