"""Layers with weights: where channels are born (outputs) and consumed (inputs)."""

from __future__ import annotations

import numpy as np

from ..groups import PARAM, WEIGHT_IN, WEIGHT_OUT
from . import rule
from .base import NodeCtx, Unsupported


# why a layer whose weight input is produced by this op is left alone
_COMPUTED_WEIGHTS = {
    "DequantizeLinear": "weights are dequantized at run time (QDQ): quantized layers keep their channels; "
                        "prune the float model, then quantize",
    "Cast": "weights are cast at run time (e.g. float16/bfloat16 storage), not a constant the pruner can slice",
}


def _weight(ctx: NodeCtx, i: int) -> list[int]:
    """Shape of a constant weight input (its values are not loaded: large weights stay on the proto)."""
    if not ctx.is_const(i):
        t = ctx.inputs[i]
        op = t.inputs[0].op if t.inputs else None
        raise Unsupported(_COMPUTED_WEIGHTS.get(op, "weights are computed at run time, not a constant"))
    return ctx.shape(i)


def _grouped(ctx: NodeCtx, in_ids: np.ndarray, groups: int, per_group_out: int) -> np.ndarray:
    """Grouped conv: a group's inputs and outputs go together, so whole groups are removed."""
    k = len(in_ids) // groups
    reps = np.array([ctx.union_within(in_ids[g * k:(g + 1) * k]) for g in range(groups)], dtype=np.int64)
    return np.repeat(reps, per_group_out)


def _by_position(ctx: NodeCtx, groups: int, per_group_in: int) -> bool:
    """Prune a grouped conv inside its groups rather than in whole groups?

    Inside: position ``j`` of every group is one channel (inputs and outputs alike), so every
    group keeps the same width and ``group`` stays. That is finer when the groups are fewer
    than their width (split attention's radix 2 over 64 channels), and the only way to prune
    the outputs when the input carries no channels."""
    lab = ctx.label(0)
    return per_group_in > 1 and (per_group_in > groups or lab is None or lab.axis != 1)


def _within_groups(ctx: NodeCtx, in_ids: np.ndarray, groups: int, per_group_out: int) -> tuple:
    """Couple input position ``j`` across groups; returns (input ids per group, output ids per group)."""
    k = len(in_ids) // groups
    first = in_ids[:k]
    for g in range(1, groups):
        ctx.union(first, in_ids[g * k:(g + 1) * k])
    return first, ctx.new_ids(per_group_out)


def _bias(ctx: NodeCtx, i: int, out_ids: np.ndarray) -> None:
    if ctx.present(i):
        b = ctx.const(i)
        if b is None:
            raise Unsupported("bias is computed at run time")
        if b.ndim >= 1 and b.shape[-1] == len(out_ids) and len(out_ids) > 1:
            ctx.member(i, b.ndim - 1, out_ids, PARAM)


def _channel_input(ctx: NodeCtx) -> np.ndarray:
    lab = ctx.label(0)
    if lab is not None and lab.axis != 1:
        ctx.fix(lab.ids, "channels on a spatial axis of a convolution input")
    return ctx.ids_on(0, 1)


def _group_fixup(ctx: NodeCtx, per_group: int):
    out = ctx.outputs[0].name
    node = ctx.node

    def fix(view):
        view.set_attr(node, "group", view.new_size(out) // per_group)
    ctx.fixup(fix)


@rule("Conv")
def conv(ctx: NodeCtx) -> None:
    w = _weight(ctx, 1)
    groups = int(ctx.attr("group", 1))
    in_ids = _channel_input(ctx)
    cout = w[0]
    if groups == 1 or _by_position(ctx, groups, w[1]):
        per_in, per_out = _within_groups(ctx, in_ids, groups, cout // groups)
        if ctx.label(0) is not None and ctx.label(0).axis == 1:
            ctx.member(1, 1, per_in, WEIGHT_IN)
        out = np.tile(per_out, groups)
    else:
        out = _grouped(ctx, in_ids, groups, cout // groups)
        _group_fixup(ctx, cout // groups)
    ctx.member(1, 0, out, WEIGHT_OUT)
    _bias(ctx, 2, out)
    ctx.set(0, 1, out)


@rule("ConvTranspose")
def conv_transpose(ctx: NodeCtx) -> None:
    w = _weight(ctx, 1)
    groups = int(ctx.attr("group", 1))
    in_ids = _channel_input(ctx)
    per_group_out = w[1]
    if groups == 1:
        out = ctx.new_ids(per_group_out)
        ctx.member(1, 1, out, WEIGHT_OUT)
    else:
        out = _grouped(ctx, in_ids, groups, per_group_out)
        _group_fixup(ctx, per_group_out)
    if ctx.label(0) is not None and ctx.label(0).axis == 1:
        ctx.member(1, 0, in_ids, WEIGHT_IN)
    _bias(ctx, 2, out)
    ctx.set(0, 1, out)


@rule("Gemm")
def gemm(ctx: NodeCtx) -> None:
    w = _weight(ctx, 1)
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    k_axis_a = 0 if trans_a else 1
    k_axis_w, n_axis_w = (1, 0) if trans_b else (0, 1)
    lab = ctx.label(0)
    if lab is not None:
        if lab.axis == k_axis_a:
            ctx.member(1, k_axis_w, lab.ids, WEIGHT_IN)
        else:
            ctx.fix(lab.ids, "channels on the row axis of a Gemm input")
    out = ctx.new_ids(w[n_axis_w])
    ctx.member(1, n_axis_w, out, WEIGHT_OUT)
    _bias(ctx, 2, out)
    ctx.set(0, 1, out)


@rule("MatMul")
def matmul(ctx: NodeCtx) -> None:
    a_const, b_const = ctx.is_const(0), ctx.is_const(1)
    ra, rb = ctx.rank(0), ctx.rank(1)
    ro = ctx.rank(ctx.outputs[0])
    if a_const and b_const:
        return
    if ra < 2 or rb < 2:
        for i in (0, 1):
            ctx.fix_input(i, "1-D MatMul operand")
        return
    if b_const:  # x @ W: features on the last axis
        _dense(ctx, x=0, w=1, x_axis=ra - 1, w_in=rb - 2, w_out=rb - 1, out_axis=ro - 1)
        return
    if a_const:  # W @ x: features on the row axis
        _dense(ctx, x=1, w=0, x_axis=rb - 2, w_in=ra - 1, w_out=ra - 2, out_axis=ro - 2)
        return
    _matmul_activations(ctx, ra, rb, ro)


def _dense(ctx: NodeCtx, *, x: int, w: int, x_axis: int, w_in: int, w_out: int, out_axis: int) -> None:
    """MatMul with a constant operand: x's channels are W's input axis, W's output axis is a new root."""
    lab = ctx.label(x)
    if lab is not None:
        if lab.axis == x_axis:
            ctx.member(w, w_in, lab.ids, WEIGHT_IN)
        else:
            ctx.fix(lab.ids, "channels on a non-contracted axis of a MatMul with constant weights")
    out = ctx.new_ids(ctx.shape(w)[w_out])
    ctx.member(w, w_out, out, WEIGHT_OUT)
    ctx.set(0, out_axis, out)


def _matmul_activations(ctx: NodeCtx, ra: int, rb: int, ro: int) -> None:
    """A @ B of two activations (attention): contracted channels pair up, other axes pass through."""
    la, lb = ctx.label(0), ctx.label(1)
    sa, sb = ctx.shape(0), ctx.shape(1)
    if (la is not None and la.axis == ra - 1) or (lb is not None and lb.axis == rb - 2):
        ctx.union(ctx.ids_on(0, ra - 1), ctx.ids_on(1, rb - 2))
    targets = {}
    if la is not None and la.axis != ra - 1:
        targets.setdefault(ro - 2 if la.axis == ra - 2 else la.axis + ro - ra, []).append((0, la))
    if lb is not None and lb.axis != rb - 2:
        targets.setdefault(ro - 1 if lb.axis == rb - 1 else lb.axis + ro - rb, []).append((1, lb))
    if not targets:
        return
    if len(targets) > 1:
        for _, lab in (x for v in targets.values() for x in v):
            ctx.fix(lab.ids, "both MatMul operands carry channels on different output axes")
        return
    (axis, labs), = targets.items()
    ids = labs[0][1].ids
    if len(labs) == 2:
        ctx.union(labs[0][1].ids, labs[1][1].ids)
    elif axis < ro - 2:  # a batch axis: the other operand must broadcast along it or be coupled
        other, r_other, s_other = (1, rb, sb) if labs[0][0] == 0 else (0, ra, sa)
        ax_other = axis - (ro - r_other)
        if ax_other >= 0 and s_other[ax_other] != 1:
            ctx.union(ids, ctx.ids_on(other, ax_other))
    ctx.set(0, axis, ids)


def _einsum_terms(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Operand and output subscripts with ``...`` spelled out as capital letters (implicit output: the
    letters that appear once, sorted)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise Unsupported(f"einsum '{equation}' does not match its {len(ranks)} inputs")
    ell = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks) if "..." in t), default=0)
    fill = "".join(chr(ord("A") + k) for k in range(ell))

    def spell(t: str, r: int) -> str:
        return t.replace("...", fill[ell - (r - len(t.replace("...", ""))):]) if "..." in t else t
    terms = [spell(t, r) for t, r in zip(terms, ranks)]
    if not arrow:
        letters = "".join(terms)
        rhs = fill + "".join(sorted(c for c in set(letters) if letters.count(c) == 1 and c not in fill))
    out = rhs.replace("...", fill)
    if any(len(set(t)) != len(t) for t in terms + [out]) or any(len(t) != r for t, r in zip(terms, ranks)):
        raise Unsupported(f"einsum '{equation}': repeated subscripts (diagonals) or a rank mismatch")
    return terms, out


@rule("Einsum")
def einsum(ctx: NodeCtx) -> None:
    """Channels follow their subscript: the same letter in several operands is one channel position by
    position (contracted like MatMul's inner axis, or kept), and it lands on that letter's output axis."""
    idx = [i for i in range(len(ctx.inputs)) if ctx.present(i)]
    labs = {i: ctx.label(i) for i in idx if ctx.label(i) is not None}
    if not labs:
        return
    terms, out = _einsum_terms(str(ctx.attr("equation").decode() if isinstance(ctx.attr("equation"), bytes)
                                   else ctx.attr("equation")), [ctx.rank(i) for i in idx])
    letters = {terms[idx.index(i)][lab.axis] for i, lab in labs.items()}
    if len(letters) > 1:
        for i in labs:
            ctx.fix_input(i, "operands carry channels on different subscripts")
        return
    (letter,) = letters
    ids = next(iter(labs.values())).ids
    for pos, i in enumerate(idx):
        t = terms[pos]
        if letter not in t or ctx.shape(i)[t.index(letter)] == 1:
            continue
        ax = t.index(letter)
        if i in labs:
            ctx.union(ids, labs[i].ids)
        elif ctx.is_const(i):
            ctx.member(i, ax, ids, WEIGHT_IN if letter not in out else PARAM)
        else:
            ctx.union(ids, ctx.ids_on(i, ax))
    if letter in out:
        ctx.set(0, out.index(letter), ids)
