"""Llama-style attention exported with dynamic batch and sequence: RoPE's rotate_half (slice bounds
read from the shape, cos/sin computed at run time) and GQA's repeat_kv (Expand to a shape read at
run time, then Reshape). Head dimensions go in RoPE pairs (i, i + d/2); k and v shrink with q."""

import numpy as np
from builders import GraphBuilder
from engine_util import prune_model
from onnx import TensorProto, helper
from test_rules_shape_algebra import Shapes

from onnxprune import runtime

T, D, H, KV = 4, 32, 4, 2
DH = D // H
I64 = np.int64


def llama_attention():
    g = GraphBuilder(None)
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D]))
    g.inputs.append(helper.make_tensor_value_info("pos", TensorProto.INT64, ["B", "T"]))
    g.shapes["x"] = [1, T, D]
    s = Shapes(g, True)

    # cos/sin [B, 1, T, DH] computed at run time from the positions (no channels of their own)
    inv = g.const((1.0 / 10000 ** (np.arange(0, DH, 2) / DH)).astype(np.float32).reshape(1, 1, DH // 2))
    freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", ["pos"], to=1), g.const(np.array([2], I64))]), inv])
    emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.const(np.array([1], I64))])
    cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])

    def heads(t, n):
        return g.transpose(g.op("Reshape", [t, s.target("x", n, DH)]), [0, 2, 1, 3])

    def rotate_half(t):
        half = g.op("Div", [g.op("Gather", [g.op("Shape", [t]), g.const(np.array(3, I64))], axis=0),
                            g.const(np.array(2, I64))])
        half = g.op("Unsqueeze", [half, g.const(np.array([0], I64))])
        big, last = g.const(np.array([2 ** 62], I64)), g.const(np.array([3], I64))
        x1 = g.op("Slice", [t, g.const(np.array([0], I64)), half, last])
        x2 = g.op("Slice", [t, half, big, last])
        return g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)

    def rope(t):
        return g.add(g.mul(t, cos), g.mul(rotate_half(t), sin))

    def repeat_kv(t):
        """[B, KV, T, DH] -> [B, KV, H/KV, T, DH] (Expand) -> [B, H, T, DH] (Reshape), sizes read at run time."""
        b, t_len = s.dim(t, 0), s.dim(t, 2)
        kv, dh = g.const(np.array([KV], I64)), g.const(np.array([DH], I64))
        rep = g.const(np.array([H // KV], I64))
        e = g.op("Expand", [g.op("Unsqueeze", [t, g.const(np.array([2], I64))]),
                            g.op("Concat", [b, kv, rep, t_len, dh], axis=0)])
        return g.op("Reshape", [e, g.op("Concat", [b, g.const(np.array([H], I64)), t_len, dh], axis=0)])

    q = rope(heads(g.matmul("x", D, bias=False), H))
    k = repeat_kv(rope(heads(g.matmul("x", KV * DH, bias=False), KV)))
    v = repeat_kv(heads(g.matmul("x", KV * DH, bias=False), KV))
    d = g.op("Cast", [g.op("Gather", [g.op("Shape", [q]), g.const(np.array(-1, I64))], axis=0)], to=1)
    scores = g.op("Div", [g.op("MatMul", [q, g.transpose(k, [0, 1, 3, 2])]), g.op("Sqrt", [d])])
    o = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    o = g.op("Reshape", [g.transpose(o, [0, 2, 1, 3]), s.target("x", -1)])
    g.shapes[o] = [1, T, D]
    x = g.add("x", g.matmul(o, D, bias=False))
    up = g.op("Mul", [g.op("Sigmoid", [g.matmul(x, 2 * D, bias=False)]), g.matmul(x, 2 * D, bias=False)])
    g.output(g.add(x, g.matmul(up, D, bias=False)))
    return g.build()


def _matmul_weights(proto):
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    return [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_rope_pairs_and_gqa_prune_every_projection(tmp_path):
    r = prune_model(tmp_path, llama_attention(), ratio=0.5)
    q, k, v, o, gate, up, down = _matmul_weights(r.proto)
    # head dims: RoPE pairs (i, i + DH/2) make DH/2 = 4 channels per head, half of them go
    assert q == [D, H * DH // 2] and k == [D, KV * DH // 2] and o == [H * DH // 2, D]
    assert v == [D, KV * DH // 2]
    assert gate == up == [D, D] and down == [D, D]
    feed = {"x": np.ones((2, 5, D), np.float32), "pos": np.tile(np.arange(5, dtype=I64), (2, 1))}
    assert next(iter(runtime.run(runtime.session(r.proto), feed).values())).shape == (2, 5, D)


def test_rope_pairs_are_coupled():
    from onnxprune.analysis import analyze
    a = analyze(llama_attention())
    qk = next(g for g in a.prunable if any("MatMul" in m.node for m in g.members) and g.size == DH // 2)
    # every query projection output position belongs to a pair with the one DH/2 further in its head
    member = next(m for m in qk.members if m.kind == "weight_out")
    idx = member.index.reshape(-1, DH)
    assert (idx[:, : DH // 2] == idx[:, DH // 2:]).all()


def test_whole_kv_heads_go_with_the_query_heads_that_read_them(tmp_path):
    from onnxprune.analysis import analyze
    a = analyze(llama_attention(), split_carrier="outer")
    kv = [g for g in a.prunable if g.structure == "kv_head"]
    assert len(kv) == 1 and kv[0].size == KV
    r = prune_model(tmp_path, llama_attention(), ratio=0.5, split_carrier="outer")
    q, k, v, o = _matmul_weights(r.proto)[:4]
    assert q == [D, D // 2] and k == [D, DH] and o == [D // 2, D]    # one KV head and its H/KV query heads
    structures = {g["structure"] for g in r.report()["groups"]}
    assert "kv_head" in structures and "ffn" in structures


def test_report_names_the_structure_of_each_group(tmp_path):
    r = prune_model(tmp_path, llama_attention(), ratio=0.5)
    assert sorted(g["structure"] for g in r.report()["groups"]) == ["ffn", "head_dim", "head_dim"]
