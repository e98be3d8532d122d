"""Gradient rules for Gemm and (batched, broadcasting) MatMul."""

from __future__ import annotations

from .emit import RuleContext

Grads = list  # list[str | None]


def gemm(ctx: RuleContext, gys: Grads) -> Grads:
    """Y = alpha * A' B' + beta * C, with A' = A^T when transA and B' = B^T when transB."""
    e, g = ctx.emit, gys[0]
    a, b, c = ctx.input(0), ctx.input(1), ctx.input(2)
    alpha, beta = ctx.attr("alpha", 1.0), ctx.attr("beta", 1.0)
    ta, tb = ctx.attr("transA", 0), ctx.attr("transB", 0)
    out: Grads = [None, None, None]
    if ctx.wants(0):  # dA' = alpha g B'^T, transposed back when transA
        out[0] = (e.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1) if ta
                  else e.op("Gemm", [g, b], alpha=alpha, transB=1 - tb))
    if ctx.wants(1):  # dB' = alpha A'^T g, transposed back when transB
        out[1] = (e.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta) if tb
                  else e.op("Gemm", [a, g], alpha=alpha, transA=1 - ta))
    if c and ctx.wants(2):
        gc = g if beta == 1.0 else e.op("Mul", [g, e.const(beta)])
        out[2] = e.unbroadcast(gc, ctx.shape(ctx.outputs[0]), c, ctx.shape(c))
    return out


def _swap_last(ctx: RuleContext, x: str, rank: int) -> str:
    return ctx.emit.transpose(x, list(range(rank - 2)) + [rank - 1, rank - 2])


def matmul(ctx: RuleContext, gys: Grads) -> Grads:
    """numpy matmul semantics: 1-D operands are promoted to matrices, batch dims broadcast."""
    e, g = ctx.emit, gys[0]
    a, b = ctx.input(0), ctx.input(1)
    sa, sb = ctx.shape(a), ctx.shape(b)
    ra, rb = len(sa), len(sb)
    out_shape = ctx.shape(ctx.outputs[0])
    batch = out_shape[:len(out_shape) - (ra > 1) - (rb > 1)]
    a2 = e.unsqueeze(a, [0]) if ra == 1 else a
    b2 = e.unsqueeze(b, [1]) if rb == 1 else b
    if ra == 1 and rb == 1:
        g = e.unsqueeze(g, [0, 1])
    elif ra == 1:
        g = e.unsqueeze(g, [-2])
    elif rb == 1:
        g = e.unsqueeze(g, [-1])
    out: Grads = [None, None]
    if ctx.wants(0):
        ga = e.op("MatMul", [g, _swap_last(ctx, b2, max(rb, 2))])
        ga = e.squeeze(ga, [-2]) if ra == 1 else ga
        out[0] = e.unbroadcast(ga, batch + sa[-2:], a, sa)
    if ctx.wants(1):
        gb = e.op("MatMul", [_swap_last(ctx, a2, max(ra, 2)), g])
        gb = e.squeeze(gb, [-1]) if rb == 1 else gb
        out[1] = e.unbroadcast(gb, batch + sb[-2:], b, sb)
    return out
