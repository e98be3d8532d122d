"""Elementwise ops: unary ops pass channels through; broadcasting ops couple or slice."""

from __future__ import annotations

from ..groups import PARAM
from . import rule
from .base import FIXED, NodeCtx

UNARY = (
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Mish", "Sin",
    "Cos", "Floor", "Ceil", "Round", "Sign", "Not", "Identity", "Cast", "CastLike", "ThresholdedRelu",
    "IsNaN", "IsInf", "Shrink", "Atan", "Tan", "Asin", "Acos", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
    "Swish", "BitwiseNot",
)


@rule(*UNARY)
def unary(ctx: NodeCtx) -> None:
    ctx.passthrough(0, 0)


@rule("Clip")
def clip(ctx: NodeCtx) -> None:
    for i in (1, 2):
        if ctx.present(i) and ctx.label(i) is not None:
            ctx.fix_input(i, "clip bounds carry channels")
    ctx.passthrough(0, 0)


@rule("Dropout")
def dropout(ctx: NodeCtx) -> None:
    for out in range(len(ctx.outputs)):
        ctx.passthrough(0, out)


BINARY = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Greater", "Less",
          "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
          "PRelu", "Where", "BitShift")


@rule(*BINARY)
def broadcast(ctx: NodeCtx) -> None:
    """Numpy broadcasting: all inputs that span the channel axis are coupled position by position.

    A constant spanning it is sliced. A run-time tensor spanning it without channels of its own
    (RoPE's cos/sin tables, a mask) is sliced where it is used: the rewrite reads only the kept
    positions of it (a Gather), which is exact for an elementwise op.
    """
    out = ctx.outputs[0]
    ro = ctx.rank(out)
    idx = [i for i in range(len(ctx.inputs)) if ctx.present(i)]
    axes = {}
    for i in idx:
        lab = ctx.label(i)
        if lab is not None:
            axes.setdefault(lab.axis + ro - ctx.rank(i), []).append(i)
    if not axes:
        return
    if len(axes) > 1:
        for i in idx:
            ctx.fix_input(i, "inputs carry channels on different axes")
        return
    (axis, _), = axes.items()
    ids = None
    consts, runtime = [], []
    for i in idx:
        ax = axis - (ro - ctx.rank(i))
        if ax < 0 or ctx.shape(i)[ax] == 1:
            continue
        if ctx.label(i) is None and ctx.is_const(i):
            consts.append((i, ax))
            continue
        cur = ctx.ids_on(i, ax)
        if ctx.label(i) is None and not (cur != FIXED).any():
            runtime.append((i, ax))
            continue
        if ids is None:
            ids = cur
        else:
            ctx.union(ids, cur)
    if ids is None:  # every channel-carrying input broadcasts (size 1) along the axis
        return
    for i, ax in consts:
        ctx.member(i, ax, ids, PARAM)
    ctx.set(0, axis, ids)
    for i, ax in runtime:
        ctx.take_kept(i, ax)
