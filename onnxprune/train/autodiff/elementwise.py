"""Gradient rules for elementwise ops: activations, broadcasting arithmetic, softmax, norms, reductions.

Every rule takes ``(ctx, gys)`` — the forward node's context and the gradients
of its outputs (None where no gradient flows) — and returns the gradients of
its inputs, None for an input whose gradient is not needed.
"""

from __future__ import annotations

import math

from .emit import RuleContext

Grads = list  # list[str | None]


def _unbroadcast_input(ctx: RuleContext, g: str, i: int) -> str | None:
    """``g`` (shaped like the output) summed back to input ``i``'s shape, if that input needs a gradient."""
    if not ctx.wants(i):
        return None
    name = ctx.input(i)
    return ctx.emit.unbroadcast(g, ctx.shape(ctx.outputs[0]), name, ctx.shape(name))


def _scale(ctx: RuleContext, g: str, derivative: str) -> Grads:
    """Chain rule for a unary op: ``g * f'(x)``."""
    return [ctx.emit.op("Mul", [g, derivative])]


# ------------------------------------------------------------------ pass-through
def identity(ctx: RuleContext, gys: Grads) -> Grads:
    """Identity, and Dropout in inference mode."""
    if ctx.node.op_type == "Dropout" and len(ctx.inputs) > 2 and ctx.input(2):
        if bool(ctx.value(2).reshape(-1)[0]):
            ctx.fail("Dropout in training mode has no deterministic gradient")
    return [gys[0]]


def neg(ctx: RuleContext, gys: Grads) -> Grads:
    return [ctx.emit.op("Neg", [gys[0]])]


# ------------------------------------------------------------------ activations
def relu(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    return [e.mask(e.op("Greater", [ctx.outputs[0], e.const(0.0)]), gys[0])]


def leaky_relu(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    g = gys[0]
    slope = e.op("Mul", [g, e.const(ctx.attr("alpha", 0.01))])
    return [e.op("Where", [e.op("Greater", [ctx.input(0), e.const(0.0)]), g, slope])]


def clip(ctx: RuleContext, gys: Grads) -> Grads:
    """Gradient passes strictly inside (min, max), as in PyTorch's hardtanh."""
    e = ctx.emit
    x = ctx.input(0)
    conds = []
    if ctx.input(1):
        conds.append(e.op("Greater", [x, ctx.input(1)]))
    if ctx.input(2):
        conds.append(e.op("Less", [x, ctx.input(2)]))
    if not conds:
        return [gys[0]]
    cond = conds[0] if len(conds) == 1 else e.op("And", conds)
    return [e.mask(cond, gys[0])]


def sigmoid(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y = ctx.outputs[0]
    return _scale(ctx, gys[0], e.op("Mul", [y, e.op("Sub", [e.const(1.0), y])]))


def hard_sigmoid(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y = ctx.outputs[0]
    inside = e.op("And", [e.op("Greater", [y, e.const(0.0)]), e.op("Less", [y, e.const(1.0)])])
    return [e.mask(inside, e.op("Mul", [gys[0], e.const(ctx.attr("alpha", 0.2))]))]


def hard_swish(ctx: RuleContext, gys: Grads) -> Grads:
    """y = x * clip(x/6 + 1/2, 0, 1): slope 0 below -3, 1 above 3, x/3 + 1/2 between."""
    e = ctx.emit
    x = ctx.input(0)
    mid = e.op("Add", [e.op("Mul", [x, e.const(1.0 / 3.0)]), e.const(0.5)])
    upper = e.op("Where", [e.op("Greater", [x, e.const(3.0)]), e.const(1.0), mid])
    slope = e.op("Where", [e.op("Less", [x, e.const(-3.0)]), e.const(0.0), upper])
    return _scale(ctx, gys[0], slope)


def tanh(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y = ctx.outputs[0]
    return _scale(ctx, gys[0], e.op("Sub", [e.const(1.0), e.op("Mul", [y, y])]))


def erf(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    x = ctx.input(0)
    gauss = e.op("Exp", [e.op("Neg", [e.op("Mul", [x, x])])])
    return _scale(ctx, gys[0], e.op("Mul", [gauss, e.const(2.0 / math.sqrt(math.pi))]))


def gelu(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    x = ctx.input(0)
    x2 = e.op("Mul", [x, x])
    if ctx.attr("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = e.op("Mul", [x, e.op("Add", [e.const(c), e.op("Mul", [x2, e.const(c * 0.044715)])])])
        t = e.op("Tanh", [inner])
        dinner = e.op("Add", [e.const(c), e.op("Mul", [x2, e.const(3 * c * 0.044715)])])
        sech2 = e.op("Sub", [e.const(1.0), e.op("Mul", [t, t])])
        left = e.op("Mul", [e.op("Add", [e.const(1.0), t]), e.const(0.5)])
        right = e.op("Mul", [e.op("Mul", [x, e.const(0.5)]), e.op("Mul", [sech2, dinner])])
    else:
        cdf = e.op("Erf", [e.op("Mul", [x, e.const(1.0 / math.sqrt(2.0))])])
        left = e.op("Mul", [e.op("Add", [e.const(1.0), cdf]), e.const(0.5)])
        pdf = e.op("Exp", [e.op("Mul", [x2, e.const(-0.5)])])
        right = e.op("Mul", [x, e.op("Mul", [pdf, e.const(1.0 / math.sqrt(2.0 * math.pi))])])
    return _scale(ctx, gys[0], e.op("Add", [left, right]))


def softmax(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y, g = ctx.outputs[0], gys[0]
    axis = ctx.attr("axis", -1)
    dot = e.reduce_sum(e.op("Mul", [g, y]), [axis])
    return [e.op("Mul", [y, e.op("Sub", [g, dot])])]


def log_softmax(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y, g = ctx.outputs[0], gys[0]
    axis = ctx.attr("axis", -1)
    total = e.reduce_sum(g, [axis])
    return [e.op("Sub", [g, e.op("Mul", [e.op("Exp", [y]), total])])]


def prelu(ctx: RuleContext, gys: Grads) -> Grads:
    """y = x where x > 0, slope * x elsewhere; the slope broadcasts."""
    e, g = ctx.emit, gys[0]
    x, slope = ctx.input(0), ctx.input(1)
    positive = e.op("Greater", [x, e.const(0.0)])
    gx = e.op("Where", [positive, g, e.op("Mul", [g, slope])]) if ctx.wants(0) else None
    gs = None
    if ctx.wants(1):
        gs = _unbroadcast_input(ctx, e.op("Where", [positive, e.const(0.0), e.op("Mul", [g, x])]), 1)
    return [gx, gs]


def sqrt(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    return [e.op("Div", [e.op("Mul", [gys[0], e.const(0.5)]), ctx.outputs[0]])]


def exp(ctx: RuleContext, gys: Grads) -> Grads:
    return _scale(ctx, gys[0], ctx.outputs[0])


def log(ctx: RuleContext, gys: Grads) -> Grads:
    return [ctx.emit.op("Div", [gys[0], ctx.input(0)])]


def reciprocal(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    y = ctx.outputs[0]
    return [e.op("Neg", [e.op("Mul", [gys[0], e.op("Mul", [y, y])])])]


def abs_(ctx: RuleContext, gys: Grads) -> Grads:
    return _scale(ctx, gys[0], ctx.emit.op("Sign", [ctx.input(0)]))


def pow_(ctx: RuleContext, gys: Grads) -> Grads:
    """y = a ** b: da = g * b * a ** (b - 1), db = g * y * log(a)."""
    e, g = ctx.emit, gys[0]
    a, b, y = ctx.input(0), ctx.input(1), ctx.outputs[0]
    ga = gb = None
    if ctx.wants(0):
        power = e.op("Pow", [a, e.op("Sub", [b, e.const(1.0)])])
        ga = _unbroadcast_input(ctx, e.op("Mul", [g, e.op("Mul", [b, power])]), 0)
    if ctx.wants(1):
        gb = _unbroadcast_input(ctx, e.op("Mul", [g, e.op("Mul", [y, e.op("Log", [a])])]), 1)
    return [ga, gb]


# ------------------------------------------------------------------ broadcasting arithmetic
def add(ctx: RuleContext, gys: Grads) -> Grads:
    """Add, and the variadic Sum."""
    return [_unbroadcast_input(ctx, gys[0], i) for i in range(len(ctx.inputs))]


def sub(ctx: RuleContext, gys: Grads) -> Grads:
    g = gys[0]
    gb = _unbroadcast_input(ctx, ctx.emit.op("Neg", [g]), 1) if ctx.wants(1) else None
    return [_unbroadcast_input(ctx, g, 0), gb]


def mul(ctx: RuleContext, gys: Grads) -> Grads:
    e, g = ctx.emit, gys[0]
    a, b = ctx.input(0), ctx.input(1)
    ga = _unbroadcast_input(ctx, e.op("Mul", [g, b]), 0) if ctx.wants(0) else None
    gb = _unbroadcast_input(ctx, e.op("Mul", [g, a]), 1) if ctx.wants(1) else None
    return [ga, gb]


def where(ctx: RuleContext, gys: Grads) -> Grads:
    e, g = ctx.emit, gys[0]
    cond = ctx.input(0)
    zero = e.const(0.0)
    picked = _unbroadcast_input(ctx, e.op("Where", [cond, g, zero]), 1) if ctx.wants(1) else None
    other = _unbroadcast_input(ctx, e.op("Where", [cond, zero, g]), 2) if ctx.wants(2) else None
    return [None, picked, other]


def div(ctx: RuleContext, gys: Grads) -> Grads:
    """y = a / b: da = g / b, db = -(g / b) * y."""
    e = ctx.emit
    q = e.op("Div", [gys[0], ctx.input(1)])
    gb = None
    if ctx.wants(1):
        gb = _unbroadcast_input(ctx, e.op("Neg", [e.op("Mul", [q, ctx.outputs[0]])]), 1)
    return [_unbroadcast_input(ctx, q, 0), gb]


# ------------------------------------------------------------------ normalisation
def batch_norm(ctx: RuleContext, gys: Grads) -> Grads:
    """Inference-form BatchNormalization: y = (x - mean) / sqrt(var + eps) * scale + bias."""
    if ctx.attr("training_mode", 0):
        ctx.fail("training-mode BatchNormalization is not supported; export the model in eval mode")
    if any(gys[1:]):
        ctx.fail("gradients through the running statistics outputs are not supported")
    e, g = ctx.emit, gys[0]
    x, scale, _, mean, var = ctx.inputs[:5]
    rank = ctx.rank(x)
    axes = [0] + list(range(2, rank))

    def per_channel(v: str) -> str:
        return e.unsqueeze(v, list(range(1, rank - 1)))

    inv = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.const(ctx.attr("epsilon", 1e-5))])])])
    gain = e.op("Mul", [scale, inv])
    centred = e.op("Sub", [x, per_channel(mean)]) if ctx.wants(1) or ctx.wants(4) else None
    out: Grads = [None] * 5
    if ctx.wants(0):
        out[0] = e.op("Mul", [g, per_channel(gain)])
    if ctx.wants(1):
        out[1] = e.reduce_sum(e.op("Mul", [g, e.op("Mul", [centred, per_channel(inv)])]), axes, keepdims=False)
    if ctx.wants(2) or ctx.wants(3):
        gbias = e.reduce_sum(g, axes, keepdims=False)
        out[2] = gbias if ctx.wants(2) else None
        out[3] = e.op("Neg", [e.op("Mul", [gbias, gain])]) if ctx.wants(3) else None
    if ctx.wants(4):
        inv3 = e.op("Mul", [inv, e.op("Mul", [inv, inv])])
        coeff = e.op("Mul", [scale, e.op("Mul", [inv3, e.const(-0.5)])])
        out[4] = e.op("Mul", [e.reduce_sum(e.op("Mul", [g, centred]), axes, keepdims=False), coeff])
    return out


def layer_norm(ctx: RuleContext, gys: Grads) -> Grads:
    """LayerNormalization over axes [axis, rank); statistics are recomputed from x."""
    if any(gys[1:]):
        ctx.fail("gradients through the Mean / InvStdDev outputs are not supported")
    e, g = ctx.emit, gys[0]
    x, scale, bias = ctx.input(0), ctx.input(1), ctx.input(2)
    shape = ctx.shape(x)
    rank = len(shape)
    axes = list(range(ctx.attr("axis", -1) % rank, rank))
    count = math.prod(ctx.static_shape(x)[a] for a in axes)
    inv_n = e.const(1.0 / count)

    def mean(t: str) -> str:
        return e.op("Mul", [e.reduce_sum(t, axes), inv_n])

    centred = e.op("Sub", [x, mean(x)])
    var = mean(e.op("Mul", [centred, centred]))
    rstd = e.op("Reciprocal", [e.op("Sqrt", [e.op("Add", [var, e.const(ctx.attr("epsilon", 1e-5))])])])
    xhat = e.op("Mul", [centred, rstd])
    out: Grads = [None, None, None]
    if ctx.wants(0):
        gxhat = e.op("Mul", [g, scale])
        inner = e.op("Sub", [e.op("Sub", [gxhat, mean(gxhat)]), e.op("Mul", [xhat, mean(e.op("Mul", [gxhat, xhat]))])])
        out[0] = e.op("Mul", [rstd, inner])
    if ctx.wants(1):
        out[1] = e.unbroadcast(e.op("Mul", [g, xhat]), shape, scale, ctx.shape(scale))
    if bias and ctx.wants(2):
        out[2] = e.unbroadcast(g, shape, bias, ctx.shape(bias))
    return out


# ------------------------------------------------------------------ reductions and global pools
def _mean_factor(ctx: RuleContext, x: str, y: str, axes: list[int]) -> str:
    """1 / (number of elements averaged into each output), static when shapes allow."""
    e = ctx.emit
    dims = [ctx.shape(x)[a] for a in axes]
    if None not in dims:
        return e.const(1.0 / max(math.prod(dims), 1))
    return e.op("Div", [e.cast_float(e.op("Size", [y])), e.cast_float(e.op("Size", [x]))])


def _reduce_axes(ctx: RuleContext) -> list[int] | None:
    """Normalised reduce axes (attribute before opset 18 for most Reduce ops, input after); None = identity."""
    rank = ctx.rank(ctx.input(0))
    if len(ctx.inputs) > 1 and ctx.input(1):
        axes = [int(a) for a in ctx.value(1).reshape(-1)]
    else:
        axes = list(ctx.attr("axes", []))
    if not axes:
        return None if ctx.attr("noop_with_empty_axes", 0) else list(range(rank))
    return sorted(a % rank for a in axes)


def reduce(ctx: RuleContext, gys: Grads) -> Grads:
    """ReduceSum and ReduceMean: spread the output gradient back over the reduced axes."""
    e, g = ctx.emit, gys[0]
    x, y = ctx.input(0), ctx.outputs[0]
    axes = _reduce_axes(ctx)
    if axes is None:
        return [g]
    if not ctx.attr("keepdims", 1):
        g = e.unsqueeze(g, axes)
    if ctx.node.op_type == "ReduceMean":
        g = e.op("Mul", [g, _mean_factor(ctx, x, y, axes)])
    return [e.op("Expand", [g, e.shape_of(x)])]


def global_average_pool(ctx: RuleContext, gys: Grads) -> Grads:
    e = ctx.emit
    x = ctx.input(0)
    spatial = list(range(2, ctx.rank(x)))
    g = e.op("Mul", [gys[0], _mean_factor(ctx, x, ctx.outputs[0], spatial)])
    return [e.op("Expand", [g, e.shape_of(x)])]


def _share_among_ties(ctx: RuleContext, g: str, y: str, axes: list[int]) -> str:
    """Route ``g`` to the positions of x equal to the extreme ``y`` (kept dims), split equally among ties."""
    e = ctx.emit
    hit = e.cast_float(e.op("Equal", [ctx.input(0), y]))
    ties = e.reduce_sum(hit, axes)
    return e.op("Mul", [e.op("Div", [hit, ties]), g])


def global_max_pool(ctx: RuleContext, gys: Grads) -> Grads:
    return [_share_among_ties(ctx, gys[0], ctx.outputs[0], list(range(2, ctx.rank(ctx.input(0)))))]


def reduce_extreme(ctx: RuleContext, gys: Grads) -> Grads:
    """ReduceMax and ReduceMin."""
    e, g, y = ctx.emit, gys[0], ctx.outputs[0]
    axes = _reduce_axes(ctx)
    if axes is None:
        return [g]
    if not ctx.attr("keepdims", 1):
        g, y = e.unsqueeze(g, axes), e.unsqueeze(y, axes)
    return [_share_among_ties(ctx, g, y, axes)]
