"""Einsum as exporters emit it for attention: channels follow their subscript letter."""

import numpy as np
from builders import GraphBuilder
from engine_util import prune_model, weight

T, D, H = 4, 16, 2
DH = D // H


def _einsum_attention(ellipsis=False):
    g = GraphBuilder("x", [1, T, D])

    def heads(t):
        return g.transpose(g.reshape(t, [1, T, H, DH]), [0, 2, 1, 3])
    q, k, v = (heads(g.matmul("x", D)) for _ in range(3))
    eq_s, eq_o = ("...qd,...kd->...qk", "...qk,...kd->...qd") if ellipsis else ("bhqd,bhkd->bhqk",
                                                                                 "bhqk,bhkd->bhqd")
    s = g.mul(g.op("Einsum", [q, k], equation=eq_s), g.const(np.float32(DH ** -0.5)))
    o = g.op("Einsum", [g.op("Softmax", [s], axis=-1), v], equation=eq_o)
    o = g.reshape(g.transpose(o, [0, 2, 1, 3]), [1, T, D])
    g.output(g.add("x", g.matmul(o, D)))
    return g.build()


def test_einsum_attention_prunes_head_dims(tmp_path):
    for ellipsis in (False, True):
        r = prune_model(tmp_path, _einsum_attention(ellipsis), ratio=0.5)
        mms = [n for n in r.proto.graph.node if n.op_type == "MatMul"]
        assert [weight(r.proto, n.name).shape for n in mms] == [(D, D // 2)] * 3 + [(D // 2, D)]


def test_einsum_with_a_constant_weight(tmp_path):
    g = GraphBuilder("x", [1, T, D])
    h = g.relu(g.matmul("x", 2 * D))
    w = g.weight([2 * D, D])
    y = g.op("Einsum", [h, w], equation="btf,fd->btd")
    g.output(g.add("x", y))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    ein = next(n for n in r.proto.graph.node if n.op_type == "Einsum")
    assert weight(r.proto, ein.name).shape == (D, D)
