"""Ops that move, fold, split or select axes: channel positions follow them exactly."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..groups import PARAM
from . import rule
from .base import FIXED, NodeCtx, Unsupported


# ------------------------------------------------------------------ Reshape / Flatten

def axis_runs(a: list[int], b: list[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes of equal size into consecutive runs of equal product."""
    i = j = 0
    runs = []
    while i < len(a) or j < len(b):
        ra, rb, pa, pb = [], [], 1, 1
        if i < len(a):
            ra.append(i); pa *= a[i]; i += 1
        if j < len(b):
            rb.append(j); pb *= b[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(a):
                ra.append(i); pa *= a[i]; i += 1
            elif pb < pa and j < len(b):
                rb.append(j); pb *= b[j]; j += 1
            else:
                return None
        runs.append((ra, rb))
    return runs


def fold(ctx: NodeCtx, in_shape: list[int], out_shape: list[int]) -> int | None:
    """Carry the label of input 0 through a reshape to ``out_shape``; returns the output axis (or None).

    The labelled axis may stay, merge with neighbours (ids repeat, e.g. Flatten before a classifier)
    or split into several axes (attention heads, channel shuffle). After a split, one axis carries
    the channels: one along which ids already vary alone if there is one, otherwise the largest
    (``split_carrier="outer"`` picks the outermost, i.e. whole attention heads); ids are coupled
    along the other split axes so every removal stays rectangular.
    """
    lab = ctx.label(0)
    if lab is None:
        return None
    runs = axis_runs(in_shape, out_shape)
    if runs is None:
        raise Unsupported(f"cannot match shapes {in_shape} -> {out_shape}")
    ra, rb = next((ra, rb) for ra, rb in runs if lab.axis in ra)
    sizes_in = [in_shape[k] for k in ra]
    bshape = [1] * len(ra)
    bshape[ra.index(lab.axis)] = len(lab.ids)
    joint = np.broadcast_to(lab.ids.reshape(bshape), sizes_in).reshape([out_shape[k] for k in rb] or [1])
    if not rb:
        ctx.fix(lab.ids, "channel axis folded away")
        return None
    carrier = _carrier(joint, ctx.analysis_option("split_carrier", "largest"))
    moved = np.moveaxis(joint, carrier, 0).reshape(joint.shape[carrier], -1)
    for row in moved:
        if len(set(row.tolist())) > 1:
            ctx.union_within(row)
    ids = moved[:, 0].copy()
    if len(ids) == 1:
        if ids[0] != FIXED:
            ctx.fix(ids, "channel axis reshaped to size 1")
        return None
    out_axis = rb[carrier]
    ctx.set(0, out_axis, ids)
    if len([k for k in rb if out_shape[k] > 1]) > 1:   # a split: outer axis = heads, inner = within a head
        ctx.note_structure(ids, "head" if carrier == min(range(len(rb)), key=lambda c: (out_shape[rb[c]] == 1, c))
                           else "head_dim")
    return out_axis


def _carrier(joint: np.ndarray, policy: str) -> int:
    nd = joint.ndim
    free = []
    for c in range(nd):
        moved = np.moveaxis(joint, c, 0).reshape(joint.shape[c], -1)
        if joint.shape[c] > 1 and (moved == moved[:, :1]).all():
            free.append(c)
    if free:
        return max(free, key=lambda c: (joint.shape[c], -c))
    if policy == "outer" and any(d > 1 for d in joint.shape):
        return next(c for c in range(nd) if joint.shape[c] > 1)
    return max(range(nd), key=lambda c: (joint.shape[c], -c))


@rule("Reshape")
def reshape(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    in_shape, out_shape = ctx.shape(0), ctx.shape(ctx.outputs[0])
    out_axis = fold(ctx, in_shape, out_shape)
    if out_axis is None:
        return
    in_axis = ctx.label(0).axis
    allowzero = int(ctx.attr("allowzero", 0))
    target = _shape_element(ctx, 1, out_axis, "Reshape target")
    if target is None or target == -1 or (target == 0 and not allowzero and in_axis == out_axis):
        return  # the size is inferred or copied from the (pruned) input
    _set_size(ctx, 1, out_axis)


def _shape_element(ctx: NodeCtx, i: int, k: int, what: str) -> int | None:
    """Element ``k`` of shape input ``i`` (None when ``k`` is outside it). A run-time shape is fine as
    long as that element does not change with the symbolic input dimensions (batch, sequence):
    the rewrite sets it and leaves the others to be computed at run time."""
    el = ctx.elements(i)
    if el is None:
        raise Unsupported(f"{what} computed at run time")
    value, varies = el
    value, varies = value.reshape(-1), varies.reshape(-1)
    if not 0 <= k < len(value):
        return None
    if varies[k]:
        raise Unsupported(f"{what} element {k} (the channel axis) {ctx.varies_note}")
    return int(value[k])


def _set_size(ctx: NodeCtx, i: int, k: int, out: int = 0) -> None:
    """At rewrite time, element ``k`` of shape input ``i`` becomes the new size of output ``out``'s channel axis."""
    value = ctx.elements(i)[0].astype(np.int64)
    out_name, node = ctx.outputs[out].name, ctx.node
    mask = np.zeros(value.shape, dtype=bool)
    mask.reshape(-1)[k] = True

    def fix(view):
        v = value.copy()
        v.reshape(-1)[k] = view.new_size(out_name)
        view.set_elements(node, i, v, mask)
    ctx.fixup(fix)


@rule("Flatten")
def flatten(ctx: NodeCtx) -> None:
    if ctx.label(0) is None:
        return
    s = ctx.shape(0)
    axis = int(ctx.attr("axis", 1)) % (len(s) + 1) if len(s) else 0
    fold(ctx, s, [int(np.prod(s[:axis])), int(np.prod(s[axis:]))])


# ------------------------------------------------------------------ axis moves

@rule("Transpose")
def transpose(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    perm = ctx.attr("perm") or list(reversed(range(ctx.rank(0))))
    ctx.set(0, list(perm).index(lab.axis), lab.ids)


@rule("Squeeze")
def squeeze(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    shape = ctx.shape(0)
    axes = ctx.axes_arg()
    axes = [i for i, d in enumerate(shape) if d == 1] if axes is None else [a % len(shape) for a in axes]
    if lab.axis in axes:
        return
    ctx.set(0, lab.axis - sum(1 for a in axes if a < lab.axis), lab.ids)


@rule("Unsqueeze")
def unsqueeze(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    out_rank = ctx.rank(ctx.outputs[0])
    axes = sorted(a % out_rank for a in ctx.axes_arg())
    kept = [i for i in range(out_rank) if i not in axes]
    ctx.set(0, kept[lab.axis], lab.ids)


# ------------------------------------------------------------------ join / split / select

@rule("Concat")
def concat(ctx: NodeCtx) -> None:
    idx = [i for i in range(len(ctx.inputs)) if ctx.present(i)]
    labs = {i: ctx.label(i) for i in idx if ctx.label(i) is not None}
    if not labs:
        return
    rank = ctx.rank(0)
    axis = int(ctx.attr("axis")) % rank
    lab_axes = {lab.axis for lab in labs.values()}
    if lab_axes == {axis}:
        ctx.set(0, axis, np.concatenate([ctx.ids_on(i, axis) for i in idx]))
        return
    if len(lab_axes) > 1:
        for i in labs:
            ctx.fix_input(i, "inputs carry channels on different axes")
        return
    (ch,) = lab_axes  # concatenated along another axis: channels are coupled position by position
    ids = next(iter(labs.values())).ids
    for i in idx:
        if i in labs:
            ctx.union(ids, labs[i].ids)
        elif ctx.is_const(i):
            ctx.member(i, ch, ids, PARAM)
        else:
            ctx.union(ids, ctx.ids_on(i, ch))
    ctx.set(0, ch, ids)


@rule("Split")
def split(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    axis = int(ctx.attr("axis", 0)) % ctx.rank(0)
    outs = [o for o in ctx.outputs]
    if lab.axis != axis:
        for k in range(len(outs)):
            ctx.passthrough(0, k)
        return
    start = 0
    for k, o in enumerate(outs):
        n = ctx.shape(o)[axis]
        ctx.set(k, axis, lab.ids[start:start + n])
        start += n
    names = [o.name for o in outs]
    node = ctx.node
    opset = ctx.opset

    def fix(view):
        sizes = np.array([view.new_size(n) for n in names], dtype=np.int64)
        if opset >= 13:
            view.set_const(node, 1, sizes)
            view.set_attr(node, "num_outputs", None)
        else:
            view.set_attr(node, "split", sizes.tolist())
    ctx.fixup(fix)


def _slice_args(ctx: NodeCtx, rank: int):
    """(starts, ends, axes, steps, read-at-run-time masks of starts/ends/steps, bounds are inputs)."""
    if ctx.opset < 10:
        starts, ends = ctx.attr("starts"), ctx.attr("ends")
        axes = ctx.attr("axes", list(range(len(starts))))
        still = np.zeros(len(starts), dtype=bool)
        return list(starts), list(ends), list(axes), [1] * len(starts), (still, still, still), False
    vals, varies = [], []
    for i in (1, 2, 3, 4):
        el = ctx.elements(i) if ctx.present(i) else None
        if ctx.present(i) and el is None:
            raise Unsupported("slice bounds computed at run time")
        vals.append(None if el is None else el[0].reshape(-1).tolist())
        varies.append(None if el is None else el[1].reshape(-1))
    starts, ends, axes, steps = vals
    if varies[2] is not None and varies[2].any():
        raise Unsupported(f"slice axes: {ctx.varies_note}")
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    still = np.zeros(len(starts), dtype=bool)
    masks = tuple(still if m is None else m for m in (varies[0], varies[1], varies[3]))
    return starts, ends, axes, steps, masks, True


@rule("Slice")
def slice_(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    starts, ends, axes, steps, varies, as_inputs = _slice_args(ctx, rank)
    axes = [a % rank for a in axes]
    if lab.axis not in axes:
        ctx.passthrough(0, 0)
        return
    k = axes.index(lab.axis)
    if any(m[k] for m in varies):
        raise Unsupported(f"slice bounds of the channel axis: {ctx.varies_note}")
    n = len(lab.ids)
    picked = np.arange(n)[slice(int(starts[k]), int(ends[k]), int(steps[k]))]
    if len(picked) == n and steps[k] == 1:
        ctx.passthrough(0, 0)
        return
    if steps[k] != 1:
        ctx.fix(lab.ids, "strided slice of the channel axis")
        return
    ctx.set(0, lab.axis, lab.ids[picked])
    in_name, node, first = ctx.inputs[0].name, ctx.node, int(picked[0]) if len(picked) else 0
    out_name = ctx.outputs[0].name
    mask = np.zeros(len(starts), dtype=bool)
    mask[k] = True

    def fix(view):
        kept = view.kept(in_name)
        new_start = int(np.searchsorted(kept, first))
        new_end = new_start + view.new_size(out_name)
        s, e = np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)
        s[k], e[k] = new_start, new_end
        if as_inputs:
            view.set_elements(node, 1, s.reshape(np.shape(ctx_starts)), mask.reshape(np.shape(ctx_starts)))
            view.set_elements(node, 2, e.reshape(np.shape(ctx_ends)), mask.reshape(np.shape(ctx_ends)))
        else:
            view.set_attr(node, "starts", s.tolist())
            view.set_attr(node, "ends", e.tolist())
    ctx_starts = ctx.elements(1)[0] if as_inputs else None
    ctx_ends = ctx.elements(2)[0] if as_inputs else None
    ctx.fixup(fix)


@rule("Gather")
def gather(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if ctx.label(1) is not None:
        ctx.fix_input(1, "channel-carrying tensor used as gather indices")
    if lab is None:
        return
    axis = int(ctx.attr("axis", 0)) % ctx.rank(0)
    ind = ctx.static(1)
    if lab.axis != axis:
        nd = ctx.rank(1)
        ctx.set(0, lab.axis if lab.axis < axis else lab.axis + nd - 1, lab.ids)
        return
    if ind is None or ind.ndim != 1:
        ctx.fix(lab.ids, "gathers channels by run-time or scalar indices")
        return
    n = len(lab.ids)
    ind = ind % n
    ctx.set(0, axis, lab.ids[ind])
    in_name, node = ctx.inputs[0].name, ctx.node

    def fix(view):
        kept = view.kept(in_name)
        pos = {int(p): i for i, p in enumerate(kept)}
        view.set_const(node, 1, np.array([pos[int(p)] for p in ind if int(p) in pos], dtype=np.int64))
    ctx.fixup(fix)


@rule("Shape", "Size")
def shape_of(ctx: NodeCtx) -> None:
    """Reading a shape is fine; reading the channel count marks the value, which must end up folded
    into a shape input (the rewrite sets it) or it freezes the channels (see analysis._follow_taint)."""
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    if ctx.op == "Shape":
        start = int(ctx.attr("start", 0))
        end = ctx.attr("end")
        start = start % (rank + 1) if start < 0 else min(start, rank)
        end = rank if end is None else (int(end) % (rank + 1) if end < 0 else min(int(end), rank))
        if not (start <= lab.axis < end):
            return
        ctx.read_channel_count(lab.ids, position=lab.axis - start)
        return
    ctx.read_channel_count(lab.ids)


@rule("Expand")
def expand(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if ctx.label(1) is not None:
        ctx.fix_input(1, "channels used as a shape")
    if lab is None:
        return
    ro, ri = ctx.rank(ctx.outputs[0]), ctx.rank(0)
    axis = lab.axis + ro - ri
    el = ctx.elements(1)
    if el is None:
        ctx.fix(lab.ids, "expanded to a shape computed at run time")
        return
    ctx.set(0, axis, lab.ids)
    k = axis - (ro - el[0].size)
    target = _shape_element(ctx, 1, k, "Expand shape")
    if target is None or target in (1, -1):
        return
    _set_size(ctx, 1, k)


@rule("Tile")
def tile(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    reps = ctx.static(1)
    if reps is None or int(reps[lab.axis]) != 1:
        ctx.fix(lab.ids, "tiled along the channel axis")
        return
    ctx.passthrough(0, 0)


@rule("Pad")
def pad(ctx: NodeCtx) -> None:
    """Padding other axes passes channels. Constant padding of the channel axis adds positions of
    their own (new channels that hold the pad value): removing one of them pads less."""
    lab = ctx.label(0)
    if lab is None:
        return
    rank = ctx.rank(0)
    pads, as_input = ctx.attr("pads"), ctx.attr("pads") is None
    if as_input:
        el = ctx.elements(1)
        if el is None:
            raise Unsupported("pads computed at run time")
        pads = el[0].reshape(-1).tolist()
    axes = list(range(rank))
    if ctx.present(3):
        a = ctx.static(3)
        if a is None:
            raise Unsupported("pad axes computed at run time")
        axes = [int(x) % rank for x in a.tolist()]
    n = len(axes)
    if lab.axis not in axes or (pads[axes.index(lab.axis)] == 0 and pads[axes.index(lab.axis) + n] == 0):
        ctx.passthrough(0, 0)
        return
    k = axes.index(lab.axis)
    if as_input and el[1].reshape(-1)[[k, k + n]].any():
        raise Unsupported(f"pads of the channel axis: {ctx.varies_note}")
    mode = ctx.attr("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    before, after = int(pads[k]), int(pads[k + n])
    if mode != "constant" or before < 0 or after < 0:
        ctx.fix(lab.ids, f"pads the channel axis ({mode})")
        return
    ctx.set(0, lab.axis, np.concatenate([ctx.new_ids(before), lab.ids, ctx.new_ids(after)]))
    out_name, node, width = ctx.outputs[0].name, ctx.node, len(lab.ids)
    value = np.asarray(pads, dtype=np.int64)
    mask = np.zeros(len(pads), dtype=bool)
    mask[[k, k + n]] = True

    def fix(view):
        kept = view.kept(out_name)
        p = value.copy()
        p[k], p[k + n] = int((kept < before).sum()), int((kept >= before + width).sum())
        if as_input:
            view.set_elements(node, 1, p, mask)
        else:
            view.set_attr(node, "pads", p.tolist())
    ctx.fixup(fix)


@rule("Resize", "Upsample")
def resize(ctx: NodeCtx) -> None:
    lab = ctx.label(0)
    if lab is None:
        return
    in_shape, out_shape = ctx.shape(0), ctx.shape(ctx.outputs[0])
    if in_shape[lab.axis] != out_shape[lab.axis]:
        ctx.fix(lab.ids, "resizes the channel axis")
        return
    sizes_index = 3 if ctx.op == "Resize" and ctx.opset >= 11 else None
    if sizes_index is not None and ctx.present(sizes_index):
        sizes = ctx.static(sizes_index)
        if sizes is None:
            raise Unsupported("output sizes computed at run time")
        axes = ctx.attr("axes")
        axes = [a % len(in_shape) for a in axes] if axes else list(range(len(in_shape)))
        if lab.axis in axes:
            k = axes.index(lab.axis)
            out_name, node = ctx.outputs[0].name, ctx.node

            def fix(view):
                s = np.array(sizes, dtype=np.int64).copy()
                s[k] = view.new_size(out_name)
                view.set_const(node, sizes_index, s)
            ctx.fixup(fix)
    ctx.passthrough(0, 0)
