"""Gradient rules for ops that move values around: reshapes, Transpose, Concat, Split, Slice, Pad, Resize.

Pad (non-constant modes) and Resize are linear maps that act on one axis at a
time, so their adjoints are built from a constant matrix per axis whose rows
say which input positions each output position reads, and with what weight.
"""

from __future__ import annotations

import math

import numpy as np

from .emit import RuleContext

Grads = list  # list[str | None]


def reshape_back(ctx: RuleContext, gys: Grads) -> Grads:
    """Reshape, Flatten, Squeeze, Unsqueeze: the gradient takes the input's shape back."""
    return [ctx.emit.reshape_like(gys[0], ctx.input(0))]


def transpose(ctx: RuleContext, gys: Grads) -> Grads:
    rank = ctx.rank(ctx.input(0))
    perm = list(ctx.attr("perm", list(reversed(range(rank)))))
    return [ctx.emit.transpose(gys[0], list(np.argsort(perm)))]


def concat(ctx: RuleContext, gys: Grads) -> Grads:
    rank = ctx.rank(ctx.outputs[0])
    axis = ctx.attr("axis") % rank
    sizes = []
    for name in ctx.inputs:
        size = ctx.shape(name)[axis]
        if size is None:
            ctx.fail(f"input '{name}' has an unknown size along the concat axis")
        sizes.append(size)
    parts = ctx.emit.split(gys[0], sizes, axis)
    return [p if ctx.wants(i) else None for i, p in enumerate(parts)]


def split(ctx: RuleContext, gys: Grads) -> Grads:
    """Concatenate the output gradients, with zeros for outputs that get none."""
    e = ctx.emit
    parts = [g if g else e.zeros_like(y) for g, y in zip(gys, ctx.outputs)]
    axis = ctx.attr("axis", 0) % ctx.rank(ctx.input(0))
    return [parts[0] if len(parts) == 1 else e.op("Concat", parts, axis=axis)]


def _slice_positions(ctx: RuleContext) -> dict[int, np.ndarray]:
    """Axis -> input positions the Slice output reads along it (all inputs must be constant)."""
    shape = ctx.shape(ctx.input(0))
    starts, ends = ctx.value(1).reshape(-1), ctx.value(2).reshape(-1)
    axes = ctx.value(3, np.arange(len(starts))).reshape(-1)
    steps = ctx.value(4, np.ones(len(starts), dtype=np.int64)).reshape(-1)
    picked = {}
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % len(shape)
        if shape[axis] is None:
            ctx.fail(f"sliced axis {axis} has an unknown size")
        picked[axis] = np.arange(shape[axis])[int(start):int(end):int(step)]
    return picked


def slice_(ctx: RuleContext, gys: Grads) -> Grads:
    """Zero-pad contiguous slices back; scatter strided or reversed ones axis by axis."""
    e, g = ctx.emit, gys[0]
    shape = ctx.shape(ctx.input(0))
    rank = len(shape)
    pads = [0] * (2 * rank)
    for axis, pos in sorted(_slice_positions(ctx).items()):
        size = shape[axis]
        if len(pos) == 0 or np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos))):
            first = int(pos[0]) if len(pos) else 0
            pads[axis], pads[rank + axis] = first, size - first - len(pos)
            continue
        index_shape = [1] * rank
        index_shape[axis] = len(pos)
        indices = e.op("Expand", [e.const(pos.reshape(index_shape), np.int64), e.shape_of(g)])
        mask = np.zeros(rank, dtype=bool)
        mask[axis] = True
        full = np.zeros(rank, dtype=np.int64)
        full[axis] = size
        target = e.op("Where", [e.const(mask, np.bool_), e.ints(full), e.shape_of(g)])
        zeros = e.op("ConstantOfShape", [target], value=e.scalar_tensor(0.0))
        g = e.op("ScatterElements", [zeros, indices, g], axis=axis)
    if any(pads):
        g = e.op("Pad", [g, e.ints(pads)])
    return [g]


def _pad_amounts(ctx: RuleContext, rank: int) -> tuple[list[int], list[int]]:
    pads = [int(p) for p in ctx.value(1).reshape(-1)]
    axes = [int(a) % rank for a in ctx.value(3, np.arange(rank)).reshape(-1)]
    n = len(axes)
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[n + i]
    return begin, end


def _one_hot_rows(columns: np.ndarray, width: int) -> np.ndarray:
    matrix = np.zeros([len(columns), width])
    matrix[np.arange(len(columns)), columns] = 1.0
    return matrix


def _slice_axis(ctx: RuleContext, t: str, axis: int, start: int, stop: int, step: int = 1) -> str:
    e = ctx.emit
    ins = [t, e.ints([start]), e.ints([stop]), e.ints([axis])] + ([e.ints([step])] if step != 1 else [])
    return e.op("Slice", ins)


def _pad_axis(ctx: RuleContext, t: str, rank: int, axis: int, before: int, after: int) -> str:
    pads = [0] * (2 * rank)
    pads[axis], pads[rank + axis] = before, after
    return ctx.emit.op("Pad", [t, ctx.emit.ints(pads)]) if before or after else t


def _fold_axis(ctx: RuleContext, g: str, rank: int, axis: int, size: int, begin: int, end: int, mode: str) -> str:
    """Adjoint of reflect / edge / wrap padding on one axis: add each padded strip onto the inputs it copies."""
    parts = [_slice_axis(ctx, g, axis, begin, begin + size)]
    for left, width, start in ((True, begin, 0), (False, end, begin + size)):
        if not width:
            continue
        if width > size - (mode == "reflect"):
            ctx.fail(f"{mode} padding of {width} on an axis of size {size} is not supported")
        strip = _slice_axis(ctx, g, axis, start, start + width)
        if mode == "edge":
            strip, width, at = ctx.emit.reduce_sum(strip, [axis]), 1, 0 if left else size - 1
        elif mode == "reflect":
            strip = _slice_axis(ctx, strip, axis, -1, np.iinfo(np.int64).min, -1)
            at = 1 if left else size - 1 - width
        else:
            at = size - width if left else 0
        parts.append(_pad_axis(ctx, strip, rank, axis, at, size - at - width))
    return ctx.emit.add_all(parts)


def pad(ctx: RuleContext, gys: Grads) -> Grads:
    """constant: crop the padding off (and zero-extend where pads were negative crops);
    reflect / edge / wrap: add each padded strip back onto the input positions it copies."""
    e, g = ctx.emit, gys[0]
    x = ctx.input(0)
    shape = ctx.shape(x)
    rank = len(shape)
    begin, end = _pad_amounts(ctx, rank)
    mode = ctx.attr("mode", "constant")
    if mode == "constant":
        axes = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
        if axes:
            starts = [max(begin[a], 0) for a in axes]
            stops = [-end[a] if end[a] > 0 else np.iinfo(np.int64).max for a in axes]
            g = e.op("Slice", [g, e.ints(starts), e.ints(stops), e.ints(axes)])
        grow = [max(-p, 0) for p in begin] + [max(-p, 0) for p in end]
        return [e.op("Pad", [g, e.ints(grow)]) if any(grow) else g]
    if mode not in ("reflect", "edge", "wrap") or min(begin + end) < 0:
        ctx.fail(f"Pad mode '{mode}' with pads {begin + end} is not supported")
    for axis in range(rank):
        if begin[axis] or end[axis]:
            size = ctx.static_shape(x)[axis]
            g = _fold_axis(ctx, g, rank, axis, size, begin[axis], end[axis], mode)
    return [g]


# ------------------------------------------------------------------ Resize
def _source_coordinate(mode: str, out: np.ndarray, scale: float, size_in: int, size_out: int) -> np.ndarray:
    if mode == "half_pixel":
        return (out + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (out + 0.5) / scale - 0.5 if size_out > 1 else np.zeros_like(out)
    if mode == "align_corners":
        return out * (size_in - 1) / (size_out - 1) if size_out > 1 else np.zeros_like(out)
    if mode == "asymmetric":
        return out / scale
    raise ValueError(mode)


def _nearest(coord: np.ndarray, rounding: str) -> np.ndarray:
    floor = np.floor(coord)
    half = np.isclose(coord - floor, 0.5)
    if rounding == "floor":
        return floor
    if rounding == "ceil":
        return np.ceil(coord)
    if rounding == "round_prefer_ceil":
        return np.where(half, floor + 1, np.round(coord))
    return np.where(half, floor, np.round(coord))


def resize_matrix(size_in: int, size_out: int, scale: float, mode: str, transform: str,
                  rounding: str) -> np.ndarray:
    """[size_out, size_in] matrix M with y = M x along one axis, for nearest or linear interpolation."""
    coord = _source_coordinate(transform, np.arange(size_out, dtype=np.float64), scale, size_in, size_out)
    if mode == "nearest":
        index = np.clip(_nearest(coord, rounding), 0, size_in - 1).astype(np.int64)
        return _one_hot_rows(index, size_in)
    coord = np.clip(coord, 0, size_in - 1)
    low = np.floor(coord).astype(np.int64)
    high = np.minimum(low + 1, size_in - 1)
    frac = coord - low
    matrix = np.zeros([size_out, size_in])
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


MAX_MATRIX = 1 << 24  # entries of a dense per-axis adjoint matrix
RESIZE_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric")


def resize(ctx: RuleContext, gys: Grads) -> Grads:
    """Nearest and linear Resize: the transpose of the interpolation matrix on each resized axis."""
    e, g = ctx.emit, gys[0]
    x = ctx.input(0)
    mode = ctx.attr("mode", "nearest")
    transform = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if mode not in ("nearest", "linear") or transform not in RESIZE_TRANSFORMS:
        ctx.fail(f"Resize mode '{mode}' with coordinate_transformation_mode '{transform}' is not supported")
    if ctx.attr("antialias", 0) or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        ctx.fail("Resize with antialias or keep_aspect_ratio_policy is not supported")
    xs, ys = ctx.static_shape(x), ctx.static_shape(ctx.outputs[0])
    rank = len(xs)
    axes = [int(a) % rank for a in ctx.attr("axes", range(rank))]
    scales = ctx.value(2) if ctx.input(2) else None
    scales = None if scales is None or scales.size == 0 else [float(s) for s in scales.reshape(-1)]
    current = list(ctx.shape(ctx.outputs[0]))
    for i, axis in enumerate(axes):
        scale = scales[i] if scales else ys[axis] / xs[axis]
        if xs[axis] == ys[axis] and math.isclose(scale, 1.0):
            continue
        rounding = ctx.attr("nearest_mode", "round_prefer_floor")
        matrix = resize_matrix(xs[axis], ys[axis], scale, mode, transform, rounding)
        factor = ys[axis] // xs[axis]
        if factor * xs[axis] == ys[axis] and np.array_equal(matrix, np.repeat(np.eye(xs[axis]), factor, axis=0)):
            # every input repeated `factor` times in a row: sum each run
            runs = e.reshape(g, current[:axis] + [xs[axis], factor] + current[axis + 1:])
            g = e.reduce_sum(runs, [axis + 1], keepdims=False)
        elif matrix.size > MAX_MATRIX:
            ctx.fail(f"resizing an axis of {xs[axis]} to {ys[axis]} needs a {matrix.shape} adjoint matrix; too big")
        else:
            g = e.axis_matmul(g, axis, rank, matrix)
        current[axis] = xs[axis]
    return [g]
