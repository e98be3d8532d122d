"""onnxruntime contrib ops (com.microsoft): one small graph per op family, pruned, run and verified in onnxruntime."""

import numpy as np
import onnx
import pytest
from engine_util import prune_model, weight
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper

import onnxprune
from onnxprune import runtime

MS = "com.microsoft"
S, D, NH, NKV, HS = 3, 64, 4, 2, 16   # GroupQueryAttention on CPU wants head_size % 16 == 0
rng = np.random.default_rng(0)


def _w(name, *shape):
    return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def _vi(name, shape, dtype=TP.FLOAT):
    return oh.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits):
    g = oh.make_graph(nodes, "contrib", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid(MS, 1)])
    m.ir_version = 9
    return m


def _node(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def _attr(model, op, name):
    return next(oh.get_attribute_value(a) for a in _node(model, op).attribute if a.name == name)


def _gqa(packed=False, past=False):
    """x -> q/k/v projections (or one packed) -> GroupQueryAttention (rotary inside) -> o projection."""
    inits = [_w("Wo", NH * HS, D), _w("cos", 16, HS // 2), _w("sin", 16, HS // 2), _c("S", np.array([S])),
             _c("one", np.array([1])), _c("ax0", np.array([0]))]
    inputs = [_vi("x", [1, S, D])]
    if packed:
        inits.append(_w("Wqkv", D, (NH + 2 * NKV) * HS))
        nodes = [oh.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj")]
        qkv = ["qkv", "", ""]
    else:
        inits += [_w("Wq", D, NH * HS), _w("Wk", D, NKV * HS), _w("Wv", D, NKV * HS)]
        nodes = [oh.make_node("MatMul", ["x", f"W{c}"], [c], name=f"{c}_proj") for c in "qkv"]
        qkv = ["q", "k", "v"]
    cache = ["", ""]
    if past:
        cache = ["past_key_values.0.key", "past_key_values.0.value"]
        inputs += [_vi(n, [1, NKV, "past_sequence_length", HS]) for n in cache]
        nodes += [oh.make_node("Shape", [cache[0]], ["past_len"], start=2, end=3),
                  oh.make_node("Add", ["past_len", "S"], ["total64"])]
    else:
        inits.append(_c("total64", np.array([S])))
    nodes += [oh.make_node("Sub", ["total64", "one"], ["seqlens64"]),
              oh.make_node("Cast", ["seqlens64"], ["seqlens_k"], to=TP.INT32),
              oh.make_node("Squeeze", ["total64", "ax0"], ["total_scalar"]),
              oh.make_node("Cast", ["total_scalar"], ["total"], to=TP.INT32)]
    present = ["present.0.key", "present.0.value"] if past else ["unused_key", "unused_value"]
    nodes += [oh.make_node("GroupQueryAttention", qkv + cache + ["seqlens_k", "total", "cos", "sin"],
                           ["attn"] + present, domain=MS, name="gqa", num_heads=NH, kv_num_heads=NKV, do_rotary=1),
              oh.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj")]
    outputs = [_vi("y", [1, S, D])] + ([_vi(n, [1, NKV, "total_sequence_length", HS]) for n in present]
                                       if past else [])
    return _model(nodes, inputs, outputs, inits)


@pytest.mark.parametrize("packed", [False, True])
def test_group_query_attention_drops_whole_kv_groups(tmp_path, packed):
    r = prune_model(tmp_path, _gqa(packed=packed), ratio=0.5, round_to=1)
    assert (_attr(r.proto, "GroupQueryAttention", "num_heads"), _attr(r.proto, "GroupQueryAttention", "kv_num_heads")) \
        == (NH // 2, NKV // 2)
    assert weight(r.proto, "o_proj").shape == (NH // 2 * HS, D)
    if packed:
        assert weight(r.proto, "qkv_proj").shape == (D, (NH + 2 * NKV) // 2 * HS)
    else:
        assert [weight(r.proto, f"{c}_proj").shape[1] for c in "qkv"] == [NH // 2 * HS, NKV // 2 * HS, NKV // 2 * HS]


def test_group_query_attention_cache_inputs_keep_heads_without_opt_in(tmp_path):
    path = tmp_path / "gqa.onnx"
    onnx.save(_gqa(past=True), path)
    a = onnxprune.analyze(onnxprune.load(path), {"past_key_values.0.key": [1, NKV, 0, HS],
                                                 "past_key_values.0.value": [1, NKV, 0, HS]})
    heads = next(g for g in a.groups if g.size == NKV)
    assert heads.frozen and any("past_key_values.0.key" in r or "present.0.key" in r for r in heads.reasons)


def test_group_query_attention_cache_shrinks_with_its_kv_heads(tmp_path):
    shapes = {"past_key_values.0.key": [1, NKV, 2, HS], "past_key_values.0.value": [1, NKV, 2, HS]}
    r = prune_model(tmp_path, _gqa(past=True), ratio=0.5, round_to=1, input_shapes=shapes, kv_cache=True)
    assert _attr(r.proto, "GroupQueryAttention", "kv_num_heads") == NKV // 2
    dims = {t.name: t.type.tensor_type.shape.dim[1].dim_value for t in [*r.proto.graph.input, *r.proto.graph.output]
            if t.name not in ("x", "y")}
    assert dims == {n: NKV // 2 for n in ("past_key_values.0.key", "past_key_values.0.value", "present.0.key",
                                          "present.0.value")}


def test_multi_head_attention_with_packed_bias(tmp_path):
    n, h = 4, 8
    inits = [_w(f"W{c}", D, n * h) for c in "qkv"] + [_w("bias", 3 * n * h), _w("Wo", n * h, D)]
    nodes = [oh.make_node("MatMul", ["x", f"W{c}"], [c], name=f"{c}_proj") for c in "qkv"]
    nodes += [oh.make_node("MultiHeadAttention", ["q", "k", "v", "bias"], ["attn"], domain=MS, name="mha", num_heads=n),
              oh.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj")]
    r = prune_model(tmp_path, _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits), ratio=0.5)
    assert _attr(r.proto, "MultiHeadAttention", "num_heads") == n // 2
    assert weight(r.proto, "o_proj").shape == (n // 2 * h, D)
    assert weight(r.proto, "mha", 3).shape == (3 * n // 2 * h,)


def test_attention_with_projection_inside(tmp_path):
    n, h = 4, 8
    inits = [_w("Wqkv", D, 3 * n * h), _w("bqkv", 3 * n * h), _w("Wo", n * h, D)]
    nodes = [oh.make_node("Attention", ["x", "Wqkv", "bqkv"], ["attn"], domain=MS, name="attention", num_heads=n),
             oh.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj")]
    r = prune_model(tmp_path, _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits), ratio=0.5)
    assert _attr(r.proto, "Attention", "num_heads") == n // 2
    assert weight(r.proto, "attention").shape == (D, 3 * n // 2 * h)
    assert weight(r.proto, "o_proj").shape == (n // 2 * h, D)


def test_rotary_embedding_keeps_heads_whole(tmp_path):
    n, h = 4, 16
    inits = [_w("Wq", D, n * h), _w("cos", 16, h // 2), _w("sin", 16, h // 2), _w("Wo", n * h, D),
             _c("pos", np.arange(S, dtype=np.int64).reshape(1, S))]
    nodes = [oh.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             oh.make_node("RotaryEmbedding", ["q", "pos", "cos", "sin"], ["qr"], domain=MS, num_heads=n),
             oh.make_node("MatMul", ["qr", "Wo"], ["y"], name="o_proj")]
    r = prune_model(tmp_path, _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits), ratio=0.5)
    assert _attr(r.proto, "RotaryEmbedding", "num_heads") == n // 2
    assert weight(r.proto, "q_proj").shape == (D, n // 2 * h)   # two whole heads: rotation pairs stay intact


def test_fused_norms_pass_and_freeze_the_hidden_width(tmp_path):
    """RMSNorm (default domain), SkipLayerNorm and SkipSimplifiedLayerNorm around two MLPs with fused
    activations: the MLP channels prune, the hidden width is frozen by the norms, with their reason."""
    f = 96
    inits = [_c("g1", np.ones(D, np.float32)), _w("up1", D, f), _w("b1", f), _w("down1", f, D),
             _c("g2", np.ones(D, np.float32)), _c("beta2", np.zeros(D, np.float32)), _w("up2", D, f), _w("b2", f),
             _w("down2", f, D), _c("g3", np.ones(D, np.float32)), _w("head", D, D)]
    nodes = [oh.make_node("SimplifiedLayerNormalization", ["x", "g1"], ["n1"], axis=-1, epsilon=1e-5),
             oh.make_node("MatMul", ["n1", "up1"], ["u1"], name="up1"),
             oh.make_node("FastGelu", ["u1", "b1"], ["a1"], domain=MS, name="fastgelu"),
             oh.make_node("MatMul", ["a1", "down1"], ["d1"], name="down1"),
             oh.make_node("SkipLayerNormalization", ["d1", "x", "g2", "beta2"], ["n2", "", "", "res2"], domain=MS),
             oh.make_node("MatMul", ["n2", "up2"], ["u2"], name="up2"),
             oh.make_node("BiasGelu", ["u2", "b2"], ["a2"], domain=MS),
             oh.make_node("QuickGelu", ["a2"], ["a3"], domain=MS, alpha=1.702),
             oh.make_node("MatMul", ["a3", "down2"], ["d2"], name="down2"),
             oh.make_node("SkipSimplifiedLayerNormalization", ["d2", "res2", "g3"], ["n3"], domain=MS),
             oh.make_node("MatMul", ["n3", "head"], ["y"], name="head")]
    r = prune_model(tmp_path, _model(nodes, [_vi("x", [1, S, D])], [_vi("y", [1, S, D])], inits), ratio=0.5,
                    round_to=1)
    assert weight(r.proto, "up1").shape == (D, f // 2) and weight(r.proto, "down2").shape == (f // 2, D)
    assert weight(r.proto, "fastgelu", 1).shape == (f // 2,)
    reasons = [x for g in r.report()["frozen"] for x in g["reasons"]]
    assert any("SkipLayerNormalization" in x and "hidden width" in x for x in reasons)
    assert r.report()["barriers"] == []
    assert any("onnxruntime" in note for note in r.report().get("validity", []))


def _quantize(w, block):
    """w [K, N] -> MatMulNBits' B [N, K/block, block/2] (4-bit, low nibble first), scales [N*K/block],
    zero points [N, ceil(K/block / 2)]."""
    k, n = w.shape
    nb = -(-k // block)
    w = np.concatenate([w, np.zeros((nb * block - k, n), w.dtype)])
    blocks = w.T.reshape(n, nb, block)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    scale = np.maximum(hi - lo, 1e-6) / 15
    zp = np.clip(np.round(-lo / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    zpad = np.zeros((n, -(-nb // 2) * 2), np.uint8)
    zpad[:, :nb] = zp
    return packed, scale.astype(np.float32).reshape(-1), (zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8)


def _nbits_mlp(f=128, block=16, k_first=D):
    inits, nodes = [], []
    for name, (k, n), src, dst in (("up", (k_first, f), "x", "u"), ("down", (f, D), "r", "y")):
        b, s, z = _quantize(rng.standard_normal((k, n)).astype(np.float32), block)
        inits += [numpy_helper.from_array(b, f"{name}_B"), numpy_helper.from_array(s, f"{name}_s"),
                  numpy_helper.from_array(z, f"{name}_z")]
        nodes.append(oh.make_node("MatMulNBits", [src, f"{name}_B", f"{name}_s", f"{name}_z"], [dst], domain=MS,
                                  name=name, K=k, N=n, bits=4, block_size=block))
        if name == "up":
            nodes.append(oh.make_node("Relu", ["u"], ["r"]))
    return _model(nodes, [_vi("x", [1, S, k_first])], [_vi("y", [1, S, D])], inits)


def test_matmul_nbits_prunes_whole_quantization_blocks(tmp_path):
    f, block = 128, 16
    m = _nbits_mlp(f, block)
    r = prune_model(tmp_path, m, ratio=0.5, round_to=1)
    up, down = _node(r.proto, "MatMulNBits"), [n for n in r.proto.graph.node if n.name == "down"][0]
    attrs = {a.name: oh.get_attribute_value(a) for a in up.attribute}
    assert attrs["N"] == f // 2 and weight(r.proto, "up").shape == (f // 2, D // block, block // 2)
    dattrs = {a.name: oh.get_attribute_value(a) for a in down.attribute}
    assert dattrs["K"] == f // 2 and weight(r.proto, "down").shape == (D, f // 2 // block, block // 2)
    assert weight(r.proto, "down", 3).shape == (D, f // 2 // block // 2)   # zero points re-packed
    # the pruned model is the original with whole blocks of the hidden layer removed
    x = rng.standard_normal((1, S, D)).astype(np.float32)
    removed = r.report()["groups"][0]["removed_channels"]
    assert len(removed) == f // block // 2
    assert np.isfinite(runtime.run(runtime.session(r.proto), {"x": x})["y"]).all()


def test_matmul_nbits_barrier_names_the_op(tmp_path):
    m = _nbits_mlp(f=120, block=16)   # K=120 of the down projection is not a whole number of blocks
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    a = onnxprune.analyze(onnxprune.load(path))
    g = next(g for g in a.groups if g.size == 120)
    assert g.frozen and any("MatMulNBits" in x and "block_size" in x for x in g.reasons)
