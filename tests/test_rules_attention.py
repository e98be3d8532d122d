"""Transformer blocks: attention heads (split channel axis), MLP hidden units, LayerNorm over channels."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import node, prune_model, weight

T, D, H = 4, 16, 2
DH = D // H


def _block(layer_norm: bool = True, embed: bool = False):
    g = GraphBuilder("x", [1, T, D])
    x = g.matmul("x", D) if embed else "x"
    h = x
    if layer_norm:
        h = g.op("LayerNormalization", [x, g.const(np.ones(D, np.float32)), g.const(np.zeros(D, np.float32))],
                 axis=-1)
    q = g.reshape(g.matmul(h, D), [1, T, H, DH])
    k = g.reshape(g.matmul(h, D), [1, T, H, DH])
    v = g.reshape(g.matmul(h, D), [1, T, H, DH])
    q = g.transpose(q, [0, 2, 1, 3])
    k = g.transpose(k, [0, 2, 3, 1])
    v = g.transpose(v, [0, 2, 1, 3])
    s = g.mul(g.op("MatMul", [q, k]), g.const(np.float32(DH ** -0.5)))
    a = g.op("Softmax", [s], axis=-1)
    o = g.op("MatMul", [a, v])
    o = g.reshape(g.transpose(o, [0, 2, 1, 3]), [1, T, D])
    x = g.add(x, g.matmul(o, D))
    m = g.relu(g.matmul(x, 2 * D))
    x = g.add(x, g.matmul(m, D))
    g.output(x)
    return g.build()


def _reshape_targets(model):
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]].tolist() for n in model.graph.node if n.op_type == "Reshape"]


def test_attention_dims_pruned_uniformly_across_heads(tmp_path):
    m = _block()
    r = prune_model(tmp_path, m, ratio=0.5)
    targets = _reshape_targets(r.proto)
    assert targets[:3] == [[1, T, H, DH // 2]] * 3
    assert targets[3] == [1, T, D // 2]
    # the MLP hidden layer loses half its units; the residual stream (LayerNorm, graph I/O) is untouched
    mm = [n for n in r.proto.graph.node if n.op_type == "MatMul" and n.input[1] in
          {t.name for t in r.proto.graph.initializer}]
    assert weight(r.proto, mm[-2].name).shape == (D, D)
    assert weight(r.proto, mm[-1].name).shape == (D, D)


def test_whole_heads_with_outer_carrier(tmp_path):
    m = _block()
    r = prune_model(tmp_path, m, ratio=0.5, split_carrier="outer")
    targets = _reshape_targets(r.proto)
    assert targets[:3] == [[1, T, 1, DH]] * 3
    assert targets[3] == [1, T, DH]


def test_layernorm_over_channels_freezes_with_reason(tmp_path):
    m = _block(embed=True)
    r = prune_model(tmp_path, m, ratio=0.5)
    stream = next(f for f in r.report()["frozen"] if f["size"] == D and len(f["reasons"]) >= 1
                  and any("LayerNormalization" in x for x in f["reasons"]))
    assert any("normalises over the channel axis" in x for x in stream["reasons"])
    ln = node(r.proto, "LayerNormalization")
    scale = next(t for t in r.proto.graph.initializer if t.name == ln.input[1])
    assert list(scale.dims) == [D]
