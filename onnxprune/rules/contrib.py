"""onnxruntime's contrib ops (``com.microsoft``, and its RMSNorm in the default domain).

These are what onnxruntime-genai's model builder and onnxruntime's transformer optimizer emit:
fused attention with its KV cache, fused normalisations, fused activations and int4 weights.
Attention prunes whole heads: a head's positions are coupled (its query, key and value
projections, its cache rows), and GroupQueryAttention couples each KV head with the query
heads that read it, so a KV group (one KV head and its query heads) goes together and
``num_heads``/``kv_num_heads`` follow. Head dimensions never shrink here: these ops take one
head size for queries, keys and values, and rotary embedding pairs dimensions inside a head.
"""

from __future__ import annotations

import numpy as np

from ..groups import PARAM, WEIGHT_IN, WEIGHT_OUT
from . import rule
from .base import FIXED, NodeCtx, Unsupported

MS = "com.microsoft"


# ------------------------------------------------------------------ attention

def _heads(ctx: NodeCtx, i: int, start: int, n: int, size: int) -> np.ndarray:
    """One id per head of input ``i`` (hidden axis 2, heads of ``size`` from ``start``): each head's
    positions go together."""
    ids = ctx.ids_on(i, 2)[start:start + n * size]
    return np.array([ctx.union_within(ids[h * size:(h + 1) * size]) for h in range(n)], dtype=np.int64)


def _hidden(ctx: NodeCtx, i: int) -> None:
    """Input ``i`` must carry its channels (if any) on the hidden axis of a [B, S, D] tensor."""
    if ctx.rank(i) != 3:
        raise Unsupported(f"input {i} has rank {ctx.rank(i)}, expected [batch, sequence, hidden]")
    lab = ctx.label(i)
    if lab is not None and lab.axis != 2:
        ctx.fix(lab.ids, "channels on the batch or sequence axis of an attention input")


def _cache(ctx: NodeCtx, i: int, heads: np.ndarray, axis: int = 1) -> None:
    """A past key/value input: its head axis goes with ``heads``. A KV-cache graph input gets ids of
    its own there from the driver (frozen unless --kv-cache)."""
    if not ctx.present(i):
        return
    lab = ctx.label(i)
    t = ctx.inputs[i]
    if lab is not None and lab.axis != axis:
        ctx.fix(lab.ids, f"cache '{t.name}' carries channels off its head axis")
        lab = None
    ids = ctx.ids_on(i, axis) if lab is None or lab.axis == axis else np.zeros(len(heads), dtype=np.int64)
    if (ids == FIXED).all():
        graph_input = not t.inputs and not ctx.is_const(i)
        ctx.fix(heads, f"cache input '{t.name}' is a graph input that keeps its shape" if graph_input
                else f"cache input '{t.name}' has no channels on its head axis")
        return
    ctx.union(heads, ids)


def _set_if(ctx: NodeCtx, out: int, axis: int, ids: np.ndarray) -> None:
    if out < len(ctx.outputs) and ctx.outputs[out].name and (np.asarray(ids) != FIXED).any():
        ctx.set(out, axis, ids)


def _head_bias(ctx: NodeCtx, i: int, heads: np.ndarray, axis: int = 1) -> None:
    """A per-head input (attention bias [B, N, S, T], head sinks [N]) follows the heads or freezes them."""
    if not ctx.present(i):
        return
    shape = ctx.shape(i)
    if axis >= len(shape) or shape[axis] != len(heads) or len(heads) == 1:
        ctx.fix_input(i, "per-head input carries channels")
        return
    if ctx.is_const(i):
        ctx.member(i, axis, heads, PARAM)
    else:
        lab = ctx.label(i)
        if lab is not None and lab.axis == axis:
            ctx.union(heads, lab.ids)
        else:
            ctx.fix(heads, f"per-head input '{ctx.inputs[i].name}' is computed at run time")


def _fix_other_inputs(ctx: NodeCtx, handled: set[int]) -> None:
    for i in range(len(ctx.inputs)):
        if i not in handled and ctx.present(i) and ctx.label(i) is not None:
            ctx.fix_input(i, f"input {i} carries channels")


def _positions(heads: np.ndarray, size: int) -> np.ndarray:
    return np.repeat(heads, size)


def _count(view, tensor: str, start: int, stop: int, size: int) -> int:
    """Heads kept in positions [start, stop) of ``tensor``'s labelled axis."""
    kept = view.kept(tensor)
    return int(((kept >= start) & (kept < stop)).sum()) // size


@rule("GroupQueryAttention", domain=MS)
def group_query_attention(ctx: NodeCtx) -> None:
    """Query heads h*g .. h*g+g-1 read KV head h (g = num_heads / kv_num_heads): a KV group goes whole.

    Packed (query holds q, k and v, key/value absent) or separate inputs; the past_key/past_value
    inputs and present_key/present_value outputs [B, kv_heads, T, head_size] go with the KV heads.
    """
    nh, nkv = int(ctx.attr("num_heads")), int(ctx.attr("kv_num_heads"))
    if nkv <= 0 or nh % nkv:
        raise Unsupported(f"num_heads {nh} is not a multiple of kv_num_heads {nkv}")
    packed = not ctx.present(1)
    for i in ((0,) if packed else (0, 1, 2)):
        _hidden(ctx, i)
    width = ctx.shape(0)[2]
    hs = width // (nh + 2 * nkv) if packed else width // nh
    if packed:
        qh, kh, vh = _heads(ctx, 0, 0, nh, hs), _heads(ctx, 0, nh * hs, nkv, hs), _heads(ctx, 0, (nh + nkv) * hs, nkv, hs)
    else:
        qh, kh, vh = _heads(ctx, 0, 0, nh, hs), _heads(ctx, 1, 0, nkv, hs), _heads(ctx, 2, 0, nkv, hs)
    ctx.union(np.repeat(kh, nh // nkv), qh)
    ctx.union(kh, vh)
    _cache(ctx, 3, kh)
    _cache(ctx, 4, vh)
    _head_bias(ctx, 10, qh)
    _head_bias(ctx, 11, qh, axis=0)
    _fix_other_inputs(ctx, {0, 1, 2, 3, 4, 10, 11})
    _set_if(ctx, 0, 2, ctx.ids_on(0, 2)[:nh * hs])
    _set_if(ctx, 1, 1, kh)
    _set_if(ctx, 2, 1, vh)
    _set_if(ctx, 3, 1, qh)
    if (qh == FIXED).all():
        return
    node, q, k = ctx.node, ctx.inputs[0].name, ctx.inputs[0 if packed else 1].name
    q_start, k_start = 0, nh * hs if packed else 0
    labelled = {t.name for t in ctx.inputs[:3] if t.name and ctx.label(t) is not None}

    def fix(view):
        def heads(name, start, count):
            return _count(view, name, start, start + count * hs, hs) if name in labelled else count
        view.set_attr(node, "num_heads", heads(q, q_start, nh))
        view.set_attr(node, "kv_num_heads", heads(k, k_start, nkv))
    ctx.fixup(fix)


@rule("MultiHeadAttention", domain=MS)
def multi_head_attention(ctx: NodeCtx) -> None:
    """Separate [B, S, D] query, key and value (plus an optional packed bias D+D+Dv): whole heads."""
    n = int(ctx.attr("num_heads"))
    if not (ctx.present(1) and ctx.present(2)) or ctx.rank(0) != 3 or ctx.rank(1) != 3 or ctx.rank(2) != 3:
        raise Unsupported("packed or 4-D query/key/value (only separate [batch, sequence, hidden] inputs prune)")
    for i in (0, 1, 2):
        _hidden(ctx, i)
    d, dv = ctx.shape(0)[2], ctx.shape(2)[2]
    hq, hv = d // n, dv // n
    qh, kh, vh = _heads(ctx, 0, 0, n, hq), _heads(ctx, 1, 0, n, hq), _heads(ctx, 2, 0, n, hv)
    ctx.union(qh, kh)
    ctx.union(qh, vh)
    if ctx.present(3):
        if not ctx.is_const(3):
            raise Unsupported("bias computed at run time")
        ctx.member(3, 0, np.concatenate([_positions(qh, hq), _positions(qh, hq), _positions(qh, hv)]), PARAM)
    _head_bias(ctx, 5, qh)
    _cache(ctx, 6, qh)
    _cache(ctx, 7, qh)
    _fix_other_inputs(ctx, {0, 1, 2, 3, 5, 6, 7})
    _set_if(ctx, 0, 2, ctx.ids_on(2, 2))
    _set_if(ctx, 1, 1, qh)
    _set_if(ctx, 2, 1, qh)
    _set_if(ctx, 3, 1, qh)
    if (qh == FIXED).all():
        return
    node, q = ctx.node, ctx.inputs[0].name

    def fix(view):
        view.set_attr(node, "num_heads", view.new_size(q) // hq)
    ctx.fixup(fix)


@rule("Attention", domain=MS)
def attention(ctx: NodeCtx) -> None:
    """Input projection inside: weights [D_in, D+D+Dv] (heads are new channels), bias [D+D+Dv];
    the past/present cache [2, B, N, T, H] goes with the heads."""
    n = int(ctx.attr("num_heads"))
    if not ctx.is_const(1):
        raise Unsupported("weights computed at run time")
    _hidden(ctx, 0)
    w = ctx.shape(1)
    sizes = [int(s) for s in ctx.attr("qkv_hidden_sizes", [])] or [w[1] // 3] * 3
    if sum(sizes) != w[1] or sizes[0] != sizes[1] or any(s % n for s in sizes):
        raise Unsupported(f"qkv_hidden_sizes {sizes} do not split the weights' {w[1]} columns into {n} heads")
    hq, hv = sizes[0] // n, sizes[2] // n
    heads = ctx.new_ids(n)
    cols = np.concatenate([_positions(heads, hq), _positions(heads, hq), _positions(heads, hv)])
    lab = ctx.label(0)
    if lab is not None and lab.axis == 2:
        ctx.member(1, 0, lab.ids, WEIGHT_IN)
    ctx.member(1, 1, cols, WEIGHT_OUT)
    if ctx.present(2):
        if not ctx.is_const(2):
            raise Unsupported("bias computed at run time")
        ctx.member(2, 0, cols, PARAM)
    _cache(ctx, 4, heads, axis=2)
    _head_bias(ctx, 5, heads)
    _fix_other_inputs(ctx, {0, 1, 2, 4, 5})
    ctx.set(0, 2, _positions(heads, hv))
    _set_if(ctx, 1, 2, heads)
    node, out, has_sizes = ctx.node, ctx.outputs[0].name, "qkv_hidden_sizes" in ctx.attrs

    def fix(view):
        kept = view.new_size(out) // hv
        view.set_attr(node, "num_heads", kept)
        if has_sizes:
            view.set_attr(node, "qkv_hidden_sizes", [kept * hq, kept * hq, kept * hv])
    ctx.fixup(fix)


@rule("RotaryEmbedding", domain=MS)
def rotary_embedding(ctx: NodeCtx) -> None:
    """Rotation pairs dimensions inside a head: heads pass whole, head dimensions freeze."""
    lab = ctx.label(0)
    _fix_other_inputs(ctx, {0})
    if lab is None:
        return
    rank = ctx.rank(0)
    if lab.axis == 0 or (rank == 4 and lab.axis == 1):   # batch, or the head axis of [B, N, S, H]
        ctx.passthrough(0, 0)
        return
    if rank != 3 or lab.axis != 2:
        ctx.fix(lab.ids, "rotary embedding over the channel axis pairs dimensions inside a head")
        return
    n = int(ctx.attr("num_heads", 0))
    width = ctx.shape(0)[2]
    hs = width // n if n > 0 else 2 * ctx.shape(2)[-1]
    if hs <= 0 or width % hs:
        raise Unsupported(f"cannot split hidden width {width} into heads of {hs}")
    heads = _heads(ctx, 0, 0, width // hs, hs)
    ctx.set(0, 2, _positions(heads, hs))
    if n > 0:
        node, x = ctx.node, ctx.inputs[0].name

        def fix(view):
            view.set_attr(node, "num_heads", view.new_size(x) // hs)
        ctx.fixup(fix)


# ------------------------------------------------------------------ normalisations

OVER_HIDDEN = ("normalises over the hidden width (last axis), so removing channels changes every output: "
               "a barrier like LayerNormalization")


@rule("SimplifiedLayerNormalization")          # onnxruntime registers its RMSNorm in the default domain
def simplified_layer_norm(ctx: NodeCtx) -> None:
    _norm_from(ctx, (0,), int(ctx.attr("axis", -1)))


@rule("SimplifiedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def skip_layer_norm(ctx: NodeCtx) -> None:
    """input (+ skip (+ bias)) normalised over the last axis; output 3 is the sum before normalising."""
    skip = ctx.op.startswith("Skip")
    _norm_from(ctx, (0, 1) if skip else (0,), -1 if skip else int(ctx.attr("axis", -1)), sums=(3,) if skip else ())


def _norm_from(ctx: NodeCtx, data: tuple[int, ...], axis: int, sums: tuple[int, ...] = ()) -> None:
    """Channels on a normalised axis freeze; on a leading axis they pass to every output."""
    rank = ctx.rank(0)
    axis %= rank
    labs = {i: ctx.label(i) for i in data if ctx.present(i) and ctx.label(i) is not None}
    if not labs:
        return
    lead = {i: lab for i, lab in labs.items() if lab.axis + rank - ctx.rank(i) < axis}
    for i, lab in labs.items():
        if i not in lead:
            ctx.fix(lab.ids, OVER_HIDDEN)
    if not lead:
        return
    if len({lab.axis + rank - ctx.rank(i) for i, lab in lead.items()}) > 1 or len(lead) < len(labs):
        for i in labs:
            ctx.fix_input(i, "inputs carry channels on different axes")
        return
    i0, lab0 = next(iter(lead.items()))
    out_axis = lab0.axis + rank - ctx.rank(i0)
    ids = lab0.ids
    for i in data[1:]:
        if ctx.present(i) and i != i0:
            ax = out_axis - (rank - ctx.rank(i))
            if ax >= 0 and ctx.shape(i)[ax] != 1:
                ctx.union(ids, ctx.ids_on(i, ax))
    for out in range(len(ctx.outputs)):
        if ctx.outputs[out].name and ctx.rank(ctx.outputs[out]) == rank:
            ctx.set(out, out_axis, ids)


# ------------------------------------------------------------------ activations

@rule("QuickGelu", "Gelu", domain=MS)
def contrib_unary(ctx: NodeCtx) -> None:
    ctx.passthrough(0, 0)


@rule("FastGelu", "BiasGelu", domain=MS)
def bias_activation(ctx: NodeCtx) -> None:
    """act(x + bias), bias over the last axis: sliced with the channels there."""
    lab = ctx.label(0)
    if ctx.present(1):
        if not ctx.is_const(1):
            raise Unsupported("bias computed at run time")
        if lab is not None and lab.axis == ctx.rank(0) - 1 and ctx.shape(1)[-1] == len(lab.ids) > 1:
            ctx.member(1, ctx.rank(1) - 1, lab.ids, PARAM)
    ctx.passthrough(0, 0)


# ------------------------------------------------------------------ int4 weights

@rule("MatMulNBits", domain=MS)
def matmul_nbits(ctx: NodeCtx) -> None:
    """A @ dequantize(B)^T, B [N, K/block_size, blob] packed with per-block scales and zero points.

    Output features (rows of B) prune exactly. Input features prune in whole quantization blocks:
    the channels of one block go together (a block shares its scale and zero point). The packed
    bytes are sliced, the zero points re-packed, ``K`` and ``N`` follow."""
    k, n, bits, bs = (int(ctx.attr(a)) for a in ("K", "N", "bits", "block_size"))
    if not ctx.is_const(1) or not ctx.is_const(2) or (ctx.present(3) and not ctx.is_const(3)):
        raise Unsupported("MatMulNBits: packed weights, scales or zero points computed at run time")
    if ctx.present(4):
        raise Unsupported("MatMulNBits with g_idx (act-order): its blocks are not contiguous input channels")
    if bits not in (2, 4, 8):
        raise Unsupported(f"MatMulNBits with {bits}-bit weights")
    blocks = -(-k // bs)
    if list(ctx.shape(1)[:2]) != [n, blocks]:
        raise Unsupported(f"MatMulNBits: packed weights of shape {ctx.shape(1)}, expected [{n}, {blocks}, ...]")
    lab = ctx.label(0)
    rank = ctx.rank(0)
    block_ids = None
    if lab is not None:
        if lab.axis != rank - 1:
            ctx.fix(lab.ids, "channels on a non-contracted axis of MatMulNBits")
        elif k % bs:
            ctx.fix(lab.ids, f"MatMulNBits: K {k} is not a multiple of block_size {bs}, blocks cannot be removed")
        else:
            block_ids = np.array([ctx.union_within(lab.ids[b * bs:(b + 1) * bs]) for b in range(blocks)],
                                 dtype=np.int64)
            ctx.member(1, 1, block_ids, WEIGHT_IN)
    out = ctx.new_ids(n)
    ctx.member(1, 0, out, WEIGHT_OUT)
    if ctx.present(5):
        if not ctx.is_const(5):
            raise Unsupported("MatMulNBits: bias computed at run time")
        ctx.member(5, 0, out, PARAM)
    ctx.set(0, ctx.rank(ctx.outputs[0]) - 1, out)
    node, x, y = ctx.node, ctx.inputs[0].name, ctx.outputs[0].name
    scales = ctx.const(2)
    zeros = ctx.const(3) if ctx.present(3) else None
    sliced_k = block_ids is not None

    def fix(view):
        rows = view.kept(y)
        cols = view.kept(x)[::bs] // bs if sliced_k else np.arange(blocks)
        view.set_const(node, 2, _blockwise(scales, n, blocks, rows, cols, None))
        if zeros is not None:
            view.set_const(node, 3, _blockwise(zeros, n, blocks, rows, cols, bits))
        view.set_attr(node, "N", len(rows))
        view.set_attr(node, "K", len(cols) * bs if sliced_k else k)
    ctx.fixup(fix)


def _blockwise(values: np.ndarray, n: int, blocks: int, rows: np.ndarray, cols: np.ndarray,
               bits: int | None) -> np.ndarray:
    """Per-(row, block) scales or zero points kept at ``rows`` x ``cols``, in their original layout
    (flat or [N, blocks]; uint8 zero points packed ``8 // bits`` to a byte, low bits first, each row
    padded to whole bytes)."""
    packed = bits is not None and values.dtype == np.uint8 and bits < 8
    if not packed:
        grid = values.reshape(n, blocks)[np.ix_(rows, cols)]
        return grid.reshape(-1) if values.ndim == 1 else grid
    per = 8 // bits
    width = -(-blocks // per)
    raw = values.reshape(n, width)
    shifts = (np.arange(per) * bits).astype(np.uint8)
    unpacked = ((raw[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(n, width * per)[:, :blocks]
    grid = unpacked[np.ix_(rows, cols)]
    new_width = -(-len(cols) // per)
    pad = np.zeros((len(rows), new_width * per), dtype=np.uint8)
    pad[:, :len(cols)] = grid
    out = (pad.reshape(len(rows), new_width, per) << shifts).sum(axis=2).astype(np.uint8)
    return out.reshape(-1) if values.ndim == 1 else out
