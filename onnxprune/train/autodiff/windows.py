"""Gradient rules for sliding-window ops: Conv, ConvTranspose, MaxPool, AveragePool.

Two building blocks serve all four:

* ``back_project`` — the adjoint of a windowed map from input positions to
  output positions: a ConvTranspose with the forward strides, dilations, pads
  and group, cropped or zero-extended so its output has the input's size.
* ``weight_grad`` — the gradient of a convolution's kernel: per kernel tap, a
  strided Slice of the input times the output gradient, one MatMul per group
  that contracts over samples and positions at once; kernels with many taps
  use one Conv instead, with batch as channels and strides and dilations swapped.

Stride-1 convolutions get their input gradient from a Conv with the flipped
kernel instead, which onnxruntime runs much faster than ConvTranspose.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx

from .emit import Emitter, RuleContext

Grads = list  # list[str | None]


@dataclass
class Window:
    """Per spatial axis geometry of a windowed op, with auto_pad resolved to explicit pads."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]

    def span(self, i: int) -> int:
        return (self.kernel[i] - 1) * self.dilations[i] + 1

    def overlapping(self) -> bool:
        return any(s < self.span(i) for i, s in enumerate(self.strides))


def window(ctx: RuleContext, in_spatial: list[int], kernel: list[int]) -> Window:
    """Geometry of ``ctx.node``: kernel_shape, strides, dilations, pads or auto_pad."""
    kernel = list(ctx.attr("kernel_shape", kernel))
    nd = len(kernel)
    strides = list(ctx.attr("strides", [1] * nd))
    dilations = list(ctx.attr("dilations", [1] * nd))
    pads = list(ctx.attr("pads", [0] * (2 * nd)))
    auto = ctx.attr("auto_pad", "NOTSET")
    win = Window(kernel, strides, dilations, pads[:nd], pads[nd:])
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for i, size in enumerate(in_spatial):
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + win.span(i) - size, 0)
            small, big = total // 2, total - total // 2
            win.begin[i], win.end[i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        win.begin, win.end = [0] * nd, [0] * nd
    return win


def _conv_attrs(win: Window, group: int) -> dict:
    return dict(strides=win.strides, dilations=win.dilations, group=group)


def back_project(e: Emitter, g: str, weight: str, win: Window, in_spatial: list[int], out_spatial: list[int],
                 group: int) -> str:
    """ConvTranspose of ``g`` with ``weight`` back to ``in_spatial``: the adjoint of the forward window map."""
    nd = len(in_spatial)
    ends, out_pad, extra = [], [], []
    for i in range(nd):
        full = win.strides[i] * (out_spatial[i] - 1) + win.span(i)
        end = full - win.begin[i] - in_spatial[i]
        missing = max(-end, 0)
        ends.append(max(end, 0))
        fits = missing < win.strides[i]
        out_pad.append(missing if fits else 0)
        extra.append(0 if fits else missing)
    attrs = _conv_attrs(win, group)
    if any(out_pad):
        attrs["output_padding"] = out_pad
    gx = e.op("ConvTranspose", [g, weight], pads=win.begin + ends, **attrs)
    if any(extra):
        gx = e.op("Pad", [gx, e.ints([0] * (nd + 2) + [0, 0] + extra)])
    return gx


MAX_TAPS = 25  # kernels with more taps get their weight gradient from one Conv instead of a MatMul per tap
IM2COL_MAX_CHANNELS = 8  # ungrouped convs with fewer input channels contract an im2col tensor per sample


def weight_grad(e: Emitter, inp: str, inp_shape: list, gout: str, out_spatial: list[int], win: Window,
                group: int, out_channels: int) -> str:
    """Kernel gradient [M, C/group, *kernel] of a Conv from its input [N, C, *S] and output gradient [N, M, *O]."""
    taps = int(np.prod(win.kernel))
    if taps > MAX_TAPS:
        return _weight_grad_by_conv(e, inp, inp_shape, gout, out_spatial, win, group)
    if group == 1 and inp_shape[1] < IM2COL_MAX_CHANNELS:
        return _weight_grad_by_im2col(e, inp, inp_shape, gout, out_spatial, win, out_channels)
    return _weight_grad_by_taps(e, inp, inp_shape, gout, out_spatial, win, group, out_channels)


def _tap_slices(e: Emitter, x: str, out_spatial: list[int], win: Window) -> list[str]:
    """Per kernel tap, the strided Slice of the (padded) ``x`` that the tap reads: [..., *O] each."""
    nd = len(win.kernel)
    axes = list(range(2, nd + 2))
    steps = [e.ints(win.strides)] if any(s != 1 for s in win.strides) else []
    slices = []
    for offsets in itertools.product(*(range(k) for k in win.kernel)):
        starts = [o * d for o, d in zip(offsets, win.dilations)]
        stops = [b + s * (n - 1) + 1 for b, s, n in zip(starts, win.strides, out_spatial)]
        slices.append(e.op("Slice", [x, e.ints(starts), e.ints(stops), e.ints(axes)] + steps))
    return slices


def _padded(e: Emitter, x: str, win: Window) -> str:
    if not (any(win.begin) or any(win.end)):
        return x
    return e.op("Pad", [x, e.ints([0, 0] + win.begin + [0, 0] + win.end)])


def _weight_grad_by_im2col(e: Emitter, inp: str, inp_shape: list, gout: str, out_spatial: list[int],
                           win: Window, out_channels: int) -> str:
    """For few input channels (a first layer): the taps concatenated into [N, taps*C, P], one batched
    MatMul with the output gradient [N, P, M], summed over samples. Per-tap MatMuls would have only C
    columns each."""
    nd, channels = len(win.kernel), inp_shape[1]
    taps = int(np.prod(win.kernel))
    positions = int(np.prod(out_spatial))
    slices = _tap_slices(e, _padded(e, inp, win), out_spatial, win)
    cols = slices[0] if taps == 1 else e.op("Concat", slices, axis=1)
    cols = e.reshape(cols, [None, taps * channels, positions])
    grads = e.transpose(e.reshape(gout, [None, out_channels, positions]), [0, 2, 1])
    summed = e.reduce_sum(e.op("MatMul", [cols, grads]), [0], keepdims=False)
    kernel = e.reshape(summed, [*win.kernel, channels, out_channels])
    return e.transpose(kernel, [nd + 1, nd] + list(range(nd)))


def _weight_grad_by_taps(e: Emitter, inp: str, inp_shape: list, gout: str, out_spatial: list[int], win: Window,
                         group: int, out_channels: int) -> str:
    """With the batch moved behind the channels, each kernel tap is one strided Slice of the (padded)
    input, [C, N, *O], and its gradient is one MatMul per group that contracts samples and positions:
    [M/g, N*P] x [N*P, C/g]. No im2col matrix is ever materialised."""
    nd = len(win.kernel)
    axes = list(range(2, nd + 2))
    per_group, per_group_out = inp_shape[1] // group, out_channels // group
    x = _padded(e, e.transpose(inp, [1, 0] + axes), win)
    grads = e.reshape(e.transpose(gout, [1, 0] + axes), [group, per_group_out, None])
    per_tap = []
    for tap in _tap_slices(e, x, out_spatial, win):
        tap = e.transpose(e.reshape(tap, [group, per_group, None]), [0, 2, 1])
        per_tap.append(e.unsqueeze(e.op("MatMul", [grads, tap]), [3]))
    stacked = per_tap[0] if len(per_tap) == 1 else e.op("Concat", per_tap, axis=3)
    return e.reshape(stacked, [out_channels, per_group, *win.kernel])


def _weight_grad_by_conv(e: Emitter, inp: str, inp_shape: list, gout: str, out_spatial: list[int], win: Window,
                         group: int) -> str:
    """One Conv: the batch becomes the channel axis (grouped per conv group), the output gradient the kernel,
    and strides and dilations swap places. Few nodes for any kernel size, but slower than per-tap MatMuls."""
    nd = len(win.kernel)
    channels, spatial = inp_shape[1], inp_shape[2:]
    per_group = channels // group
    x = e.reshape(inp, [None, group, per_group, *spatial])
    x = e.transpose(x, [2, 1, 0] + list(range(3, nd + 3)))
    x = e.reshape(x, [per_group, None, *spatial])
    kern = e.transpose(gout, [1, 0] + list(range(2, nd + 2)))
    ends, sizes = [], []
    for i in range(nd):
        reach = win.strides[i] * (out_spatial[i] - 1) + 1
        end = max(win.span(i) + reach - 1 - spatial[i] - win.begin[i], 0)
        ends.append(end)
        sizes.append((spatial[i] + win.begin[i] + end - reach) // win.dilations[i] + 1)
    gw = e.op("Conv", [x, kern], kernel_shape=out_spatial, strides=win.dilations, dilations=win.strides,
              pads=win.begin + ends, group=group)
    if sizes != win.kernel:
        axes = list(range(2, nd + 2))
        gw = e.op("Slice", [gw, e.ints([0] * nd), e.ints(win.kernel), e.ints(axes)])
    return e.transpose(gw, [1, 0] + list(range(2, nd + 2)))


def _flipped_kernel(e: Emitter, w: str, shape: list[int], group: int) -> str:
    """Conv weight [M, C/g, *k] as the kernel of its adjoint: [C, M/g, *k], spatially reversed."""
    nd = len(shape) - 2
    m, per_group = shape[0], shape[1]
    t = e.reshape(w, [group, m // group, per_group, *shape[2:]])
    t = e.reshape(e.transpose(t, [0, 2, 1] + list(range(3, nd + 3))), [group * per_group, m // group, *shape[2:]])
    axes = list(range(2, nd + 2))
    return e.op("Slice", [t, e.ints([-1] * nd), e.ints([np.iinfo(np.int64).min] * nd), e.ints(axes),
                          e.ints([-1] * nd)])


def data_grad(e: Emitter, g: str, w: str, w_shape: list[int], win: Window, in_spatial: list[int],
              out_spatial: list[int], group: int) -> str:
    """Input gradient of a Conv: a Conv with the flipped kernel when strides are 1 (onnxruntime's Conv is
    much faster than its ConvTranspose), else :func:`back_project`."""
    nd = len(in_spatial)
    reach = [win.span(i) - 1 for i in range(nd)]
    if any(s != 1 for s in win.strides) or any(p > r for p, r in zip(win.begin + win.end, reach + reach)):
        return back_project(e, g, w, win, in_spatial, out_spatial, group)
    pads = [r - p for r, p in zip(reach + reach, win.begin + win.end)]
    return e.op("Conv", [g, _flipped_kernel(e, w, w_shape, group)], pads=pads, **_conv_attrs(win, group))


def _bias_grad(ctx: RuleContext, g: str) -> str | None:
    if not (ctx.input(2) and ctx.wants(2)):
        return None
    return ctx.emit.reduce_sum(g, [0] + list(range(2, ctx.rank(ctx.outputs[0]))), keepdims=False)


def conv(ctx: RuleContext, gys: Grads) -> Grads:
    g = gys[0]
    x, w = ctx.input(0), ctx.input(1)
    xs, ws, ys = ctx.shape(x), ctx.static_shape(w), ctx.shape(ctx.outputs[0])
    win = window(ctx, xs[2:], ws[2:])
    group = ctx.attr("group", 1)
    gx = data_grad(ctx.emit, g, w, ws, win, xs[2:], ys[2:], group) if ctx.wants(0) else None
    gw = weight_grad(ctx.emit, x, xs, g, ys[2:], win, group, ws[0]) if ctx.wants(1) else None
    return [gx, gw, _bias_grad(ctx, g)]


def _conv_transpose_window(ctx: RuleContext, xs: list, ws: list, ys: list) -> Window:
    """Pads of a ConvTranspose, derived from output_shape / auto_pad when those are used."""
    nd = len(ws) - 2
    win = window(ctx, [], ws[2:])
    auto = ctx.attr("auto_pad", "NOTSET")
    if ctx.attr("output_shape") is None and auto not in ("SAME_UPPER", "SAME_LOWER"):
        return win
    out_pad = list(ctx.attr("output_padding", [0] * nd))
    for i in range(nd):
        total = win.strides[i] * (xs[2 + i] - 1) + out_pad[i] + win.span(i) - ys[2 + i]
        small, big = total // 2, total - total // 2
        win.begin[i], win.end[i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    return win


def conv_transpose(ctx: RuleContext, gys: Grads) -> Grads:
    """The input gradient is a Conv with the same weight; the weight gradient swaps input and output."""
    e, g = ctx.emit, gys[0]
    x, w = ctx.input(0), ctx.input(1)
    xs, ws, ys = ctx.shape(x), ctx.static_shape(w), ctx.shape(ctx.outputs[0])
    win = _conv_transpose_window(ctx, xs, ws, ys)
    group = ctx.attr("group", 1)
    nd = len(ws) - 2
    gx = gw = None
    if ctx.wants(0):
        gx = e.op("Conv", [g, w], pads=win.begin + win.end, **_conv_attrs(win, group))
        sizes = [(ys[2 + i] + win.begin[i] + win.end[i] - win.span(i)) // win.strides[i] + 1 for i in range(nd)]
        if sizes != xs[2:]:
            gx = e.op("Slice", [gx, e.ints([0] * nd), e.ints(xs[2:]), e.ints(list(range(2, nd + 2)))])
    if ctx.wants(1):
        gw = weight_grad(e, g, ys, x, xs[2:], win, group, ws[0])
    return [gx, gw, _bias_grad(ctx, g)]


def max_pool_opset(node: onnx.NodeProto) -> int:
    """Opset the MaxPool gradient needs: 16 (ScatterElements reduction) when windows overlap."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(attrs.get("kernel_shape", []))
    strides = list(attrs.get("strides", [1] * len(kernel)))
    dilations = list(attrs.get("dilations", [1] * len(kernel)))
    spans = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    return 16 if any(s < span for s, span in zip(strides, spans)) else 13


def max_pool(ctx: RuleContext, gys: Grads) -> Grads:
    """Route each output gradient to its window's argmax, found by a MaxPool with an indices output.

    (Comparing tiled blocks with their maximum instead is slower in onnxruntime: its broadcasting
    Equal and Mul over interleaved size-1 axes cost more than MaxPool-with-indices and a scatter.)
    """
    e = ctx.emit
    x = ctx.input(0)
    win = window(ctx, ctx.shape(x)[2:], [])
    if win.overlapping() and ctx.opset < 16:
        ctx.fail("overlapping MaxPool windows need opset 16 (ScatterElements with reduction) for the gradient")
    attrs = {a.name: a for a in ctx.node.attribute if a.name != "storage_order"}
    pool = e.op("MaxPool", [x], n_out=2)
    e.nodes[-1].attribute.extend(attrs.values())
    indices = e.reshape(pool[1], [-1])
    flat = e.reshape(gys[0], [-1])
    zeros = e.reshape(e.zeros_like(x), [-1])
    scatter = dict(reduction="add") if ctx.opset >= 16 else {}
    gx = e.op("ScatterElements", [zeros, indices, flat], axis=0, **scatter)
    return [e.reshape_like(gx, x)]


def _valid_counts(win: Window, in_spatial: list[int], out_spatial: list[int]) -> np.ndarray:
    """For each output position, how many of its window's taps fall inside the (unpadded) input."""
    counts = np.ones([1, 1], dtype=np.float64)
    for i, (size, out) in enumerate(zip(in_spatial, out_spatial)):
        start = np.arange(out)[:, None] * win.strides[i] - win.begin[i]
        taps = start + np.arange(win.kernel[i])[None, :] * win.dilations[i]
        per_axis = ((taps >= 0) & (taps < size)).sum(axis=1)
        counts = counts[..., None] * per_axis.reshape([1] * counts.ndim + [out])
    return np.maximum(counts, 1)


def average_pool(ctx: RuleContext, gys: Grads) -> Grads:
    """Divide by each window's divisor, then spread over the window with a ones kernel.

    The divisor map is read off the forward op itself (AveragePool of ones times the
    count of in-bounds taps), so count_include_pad and ceil_mode follow the runtime.
    """
    e = ctx.emit
    x = ctx.input(0)
    xs, ys = ctx.shape(x), ctx.static_shape(ctx.outputs[0])
    win = window(ctx, xs[2:], [])
    channels = ctx.static_shape(x)[1]
    probe = e.op("AveragePool", [e.const(np.ones([1, 1] + xs[2:]))])
    e.nodes[-1].attribute.extend(ctx.node.attribute)
    inv_divisor = e.op("Div", [probe, e.const(_valid_counts(win, xs[2:], ys[2:]))])
    scaled = e.op("Mul", [gys[0], inv_divisor])
    ones = e.const(np.ones([channels, 1] + win.kernel))
    return [back_project(e, scaled, ones, win, xs[2:], ys[2:], channels)]
