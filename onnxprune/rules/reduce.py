"""Pooling, reductions and softmax: fine over other axes; over the channel axis only when it sums."""

from __future__ import annotations

from . import rule
from .base import NodeCtx, Unsupported

# Reducing over the channel axis is exact under removal only when removed (zeroed) channels add nothing.
SUM_LIKE = {"ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare"}


@rule("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "MaxRoiPool")
def pool(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    if lab.axis != 1:
        ctx.fix(lab.ids, "channels on a pooled (spatial) axis")
        return
    if len(ctx.outputs) > 1 and ctx.outputs[1].name and ctx.outputs[1].outputs:
        ctx.fix(lab.ids, "MaxPool indices depend on the channel count")
        return
    ctx.passthrough(0, 0)


def _axes(ctx: NodeCtx, rank: int) -> list[int]:
    axes = ctx.axes_arg("reduction axes")
    if axes is None or len(axes) == 0:
        if int(ctx.attr("noop_with_empty_axes", 0)) and ctx.op != "ArgMax":
            return []
        return list(range(rank))
    return sorted(int(a) % rank for a in axes)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
      "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
def reduce(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    axes = _axes(ctx, rank)
    keep = int(ctx.attr("keepdims", 1))
    if lab.axis in axes:
        if ctx.op not in SUM_LIKE:
            ctx.fix(lab.ids, f"{ctx.op} over the channel axis depends on the channel count")
        return
    axis = lab.axis if keep else lab.axis - sum(1 for a in axes if a < lab.axis)
    ctx.set(0, axis, lab.ids)


@rule("ArgMax", "ArgMin")
def arg_reduce(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis", 0)) % rank
    if lab.axis == axis:
        ctx.fix(lab.ids, "arg-reduction over the channel axis")
        return
    keep = int(ctx.attr("keepdims", 1))
    ctx.set(0, lab.axis if keep or lab.axis < axis else lab.axis - 1, lab.ids)


@rule("Softmax", "LogSoftmax", "Hardmax")
def softmax(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis", -1 if ctx.opset >= 13 else 1)) % rank
    mixed = [axis] if ctx.opset >= 13 else list(range(axis, rank))  # before 13: the input is coerced to 2-D
    ctx.unless_over_channels(mixed, f"{ctx.op} normalises over the channel axis")


@rule("CumSum")
def cumsum(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    axis = ctx.static(1)
    if axis is None:
        raise Unsupported("axis computed at run time")
    ctx.unless_over_channels([int(axis) % ctx.rank(0)], "cumulative sum over the channel axis")


@rule("TopK")
def topk(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    ctx.unless_over_channels([int(ctx.attr("axis", -1)) % ctx.rank(0)], "TopK over the channel axis",
                             outputs=(0, 1))
