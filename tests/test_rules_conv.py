"""Convolution coupling patterns: chains, residuals, concat, grouped/depthwise, SE, norms, transposed conv."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import attr, node, prune_model, weight


def _head(g, y, classes=5):
    return g.output(g.gemm(g.flatten(g.gap(y)), classes))


def test_chain_removes_half_of_each_group(tmp_path):
    g = GraphBuilder("x", [1, 3, 12, 12])
    y = g.relu(g.bn(g.conv("x", 8)))
    y = g.relu(g.conv(y, 16))
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape == (4, 3, 3, 3)
    assert weight(r.proto, convs[1].name).shape == (8, 4, 3, 3)
    assert weight(r.proto, node(r.proto, "Gemm").name).shape == (5, 8)
    rep = r.report()
    assert rep["groups_pruned"] == 2 and rep["verified"] is True
    assert rep["params_after"] < rep["params_before"] and rep["macs_after"] < rep["macs_before"]


def test_residual_add_couples_both_branches(tmp_path):
    g = GraphBuilder("x", [1, 3, 10, 10])
    a = g.relu(g.conv("x", 8))
    b = g.conv(g.relu(g.conv(a, 6)), 8)
    y = g.relu(g.add(a, b))
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.25)
    groups = [grp for grp in r.analysis.groups if not grp.frozen]
    residual = next(grp for grp in groups if len(grp.layers) == 2)
    assert residual.size == 8
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 6      # stem (8 -> 6)
    assert weight(r.proto, convs[2].name).shape[0] == 6      # branch end follows the stem
    assert weight(r.proto, convs[1].name).shape[0] == 5      # inner conv is its own group (6 -> 5)


def test_concat_maps_offsets_into_consumer(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 6))
    b = g.relu(g.conv(a, 4))
    y = g.concat([a, b])
    y = g.conv(y, 7)
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    last = [n for n in r.proto.graph.node if n.op_type == "Conv"][2]
    assert weight(r.proto, last.name).shape[1] == 3 + 2


def test_depthwise_and_grouped_conv_update_group(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8, k=1))
    y = g.relu(g.conv(y, 8, group=8))             # depthwise
    y = g.relu(g.conv(y, 8, k=1))
    y = g.relu(g.conv(y, 16, group=4))            # grouped: 2 in, 4 out per group
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert attr(convs[1], "group") == 4
    assert weight(r.proto, convs[1].name).shape == (4, 1, 3, 3)
    # the grouped conv loses whole groups: 4 groups of (2 in, 4 out) -> 2 groups
    assert attr(convs[3], "group") == 2
    assert weight(r.proto, convs[3].name).shape == (8, 2, 3, 3)


def test_squeeze_excitation_couples_gate_with_features(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    x = g.relu(g.conv("x", 8))
    s = g.gap(x)
    s = g.relu(g.conv(s, 4, k=1))
    s = g.op("Sigmoid", [g.conv(s, 8, k=1)])
    y = g.mul(x, s)
    _head(g, g.conv(y, 6))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 4
    assert weight(r.proto, convs[2].name).shape[0] == 4      # gate follows the features
    assert weight(r.proto, convs[1].name).shape == (2, 4, 1, 1)


def test_per_channel_constants_and_prelu_are_sliced(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.conv("x", 8)
    y = g.op("PRelu", [y, g.const(np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1, 1))])
    y = g.mul(y, g.const(np.linspace(1, 2, 8, dtype=np.float32).reshape(1, 8, 1, 1)))
    y = g.op("InstanceNormalization", [y, g.const(np.ones(8, np.float32)), g.const(np.zeros(8, np.float32))])
    y = g.add(y, g.const(np.float32(0.5)))     # scalar: untouched
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    shapes = {t.name: list(t.dims) for t in r.proto.graph.initializer}
    assert [4, 1, 1] in shapes.values() and [1, 4, 1, 1] in shapes.values()


def test_group_norm_removes_whole_groups(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8], opset=21)
    y = g.conv("x", 8)
    y = g.op("GroupNormalization", [y, g.const(np.ones(8, np.float32)), g.const(np.zeros(8, np.float32))],
             num_groups=4, epsilon=1e-5)
    g.shapes[y] = [1, 8, 8, 8]  # onnx shape inference does not see through GroupNormalization-21
    y = g.relu(y)
    g.shapes[y] = [1, 8, 8, 8]
    g.output(g.conv(y, 4))
    m = g.build(check=False)  # onnx's checker cannot infer through GroupNormalization-21
    r = prune_model(tmp_path, m, ratio=0.5)
    gn = node(r.proto, "GroupNormalization")
    assert attr(gn, "num_groups") == 2
    assert weight(r.proto, node(r.proto, "Conv").name).shape[0] == 4


def test_conv_transpose_in_and_out(tmp_path):
    g = GraphBuilder("x", [1, 3, 6, 6])
    y = g.relu(g.conv("x", 8))
    y = g.relu(g.conv_transpose(y, 6))
    _head(g, g.conv(y, 4))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    ct = node(r.proto, "ConvTranspose")
    assert weight(r.proto, ct.name).shape == (4, 3, 2, 2)


def test_pooling_resize_pad_pass_channels(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    y = g.maxpool(y)
    y = g.op("Resize", [y, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    y = g.op("Pad", [y, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    y = g.avgpool(g.conv(y, 6))
    _head(g, y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert r.report()["groups_pruned"] == 2


def test_flatten_into_gemm_expands_indices(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 6, stride=2))          # 6 x 4 x 4
    y = g.gemm(g.flatten(y), 10)
    g.output(g.gemm(g.relu(y), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    gemms = [n for n in r.proto.graph.node if n.op_type == "Gemm"]
    assert weight(r.proto, gemms[0].name).shape == (5, 3 * 16)
    removed = next(grp for grp in r.report()["groups"] if grp["size"] == 6)
    cols = next(t for t in removed["tensors"] if t["axis"] == 1 and t["tensor"].startswith("w"))
    assert len(cols["removed"]) == 3 * 16


def test_constant_node_weights_paddle_style(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    y = g.conv(y, 4)
    _head(g, y)
    m = g.build()
    # move every initializer into a Constant node, as Paddle exports do
    nodes = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in m.graph.initializer]
    del m.graph.initializer[:]
    nodes += list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    r = prune_model(tmp_path, m, ratio=0.5)
    assert weight(r.proto, [n for n in r.proto.graph.node if n.op_type == "Conv"][0].name).shape[0] == 4


def test_grouped_conv_on_the_graph_input_prunes_inside_groups(tmp_path):
    g = GraphBuilder("x", [1, 4, 8, 8])
    y = g.relu(g.conv("x", 8, group=2))           # the input has no prunable channels
    g.output(g.conv(y, 5))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    conv = node(r.proto, "Conv")
    assert attr(conv, "group") == 2
    assert weight(r.proto, conv.name).shape == (4, 2, 3, 3)   # 2 of 4 outputs in each group


def _split_attention(g, x, radix, width):
    """ResNeSt's split attention: a radix-grouped conv, a gate softmaxed over the radix axis."""
    c = g.relu(g.conv(x, radix * width, group=radix))
    c5 = g.reshape(c, [1, radix, width, 8, 8])
    s = g.op("ReduceSum", [c5, g.const(np.array([1], np.int64))], keepdims=0)
    a = g.relu(g.conv(g.gap(s), 4, k=1))
    a = g.conv(a, radix * width, k=1)
    a = g.transpose(g.reshape(a, [1, 1, radix, width]), [0, 2, 1, 3])
    a = g.reshape(g.op("Softmax", [a], axis=1), [1, radix * width])
    a = g.reshape(a, [1, radix, width, 1, 1])
    return g.op("ReduceSum", [g.mul(c5, a), g.const(np.array([1], np.int64))], keepdims=0)


def test_split_attention_prunes_inside_the_radix_groups(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    x = g.relu(g.conv("x", 8, k=1))
    y = _split_attention(g, x, radix=2, width=8)
    _head(g, g.conv(y, 6))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    frozen = [grp for grp in r.analysis.frozen if grp.size > 1]
    assert len(frozen) == 1 and "graph output" in frozen[0].reasons[0]     # only the classifier
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 4       # 8 inputs = 4 positions x 2 groups: 2 go
    assert attr(convs[1], "group") == 2
    assert weight(r.proto, convs[1].name).shape == (8, 2, 3, 3)
    assert weight(r.proto, convs[3].name).shape[0] == 8       # the gate follows the radix conv
