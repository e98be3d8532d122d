"""Barriers freeze what they touch and say why; shared initializers are copied, never corrupted; plans replay."""

import json

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import node, prune_model, weight
from onnx import helper

import onnxprune


def test_op_without_rule_is_a_barrier_with_reason(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 8))
    y = g.op("DepthToSpace", [a], blocksize=2)                # no rule: channels fold into space
    b = g.relu(g.conv("x", 6))
    g.output(g.conv(y, 4))
    g.output(g.conv(b, 4))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    rep = r.report()
    assert [b["op"] for b in rep["barriers"]] == ["DepthToSpace"]
    assert "no rule" in rep["barriers"][0]["reason"]
    frozen = next(f for f in rep["frozen"] if f["size"] == 8)
    assert any("DepthToSpace" in x for x in frozen["reasons"])
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 8        # frozen
    assert weight(r.proto, convs[1].name).shape[0] == 3        # the other branch is pruned


def test_subgraph_reading_outer_tensor_freezes_it(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 8))
    cond = g.const(np.array(True))
    out_t = helper.make_tensor_value_info("branch_out", onnx.TensorProto.FLOAT, None)
    then = helper.make_graph([helper.make_node("Identity", [a], ["branch_out"])], "then", [], [out_t])
    other = helper.make_graph([helper.make_node("Neg", [a], ["branch_out"])], "else", [], [out_t])
    y = g.op("If", [cond], then_branch=then, else_branch=other)
    g.shapes[y] = [1, 8, 8, 8]
    g.output(g.conv(y, 4))
    m = g.build(check=False)
    r = prune_model(tmp_path, m, ratio=0.5)
    assert weight(r.proto, node(r.proto, "Conv").name).shape[0] == 8
    assert any(b["op"] == "If" for b in r.report()["barriers"])


def test_tied_weights_are_copied_per_use(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    w = g.weight([8, 8, 3, 3])
    y = g.relu(g.op("Conv", [y, w], pads=[1, 1, 1, 1]))
    y = g.relu(g.op("Conv", [y, w], pads=[1, 1, 1, 1]))       # same tensor, other channels
    g.output(g.gemm(g.flatten(g.gap(y)), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert convs[1].input[1] != convs[2].input[1]
    assert weight(r.proto, convs[1].name).shape == (4, 4, 3, 3)
    assert weight(r.proto, convs[2].name).shape == (4, 4, 3, 3)


def test_deduplicated_zero_bias_shared_by_two_layers(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    zero = g.const(np.zeros(8, np.float32))
    a = g.relu(g.op("Conv", ["x", g.weight([8, 3, 3, 3]), zero], pads=[1, 1, 1, 1]))
    b = g.relu(g.op("Conv", [a, g.weight([8, 8, 3, 3]), zero], pads=[1, 1, 1, 1]))
    c = g.relu(g.op("Conv", [b, g.weight([8, 8, 1, 1]), zero]))   # third user, also pruned differently
    g.output(g.gemm(g.flatten(g.gap(c)), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.25)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert all(weight(r.proto, c.name, 2).shape == (6,) for c in convs)


def test_plan_replays_to_the_same_model(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    y = g.add(y, g.conv(y, 8))
    g.output(g.gemm(g.flatten(g.gap(g.relu(g.conv(y, 12)))), 3))
    m = g.build()
    first = prune_model(tmp_path, m, ratio=0.5)
    plan = json.loads(json.dumps(first.plan.to_json(first.analysis)))
    again = onnxprune.prune(tmp_path / "model.onnx", plan=plan)
    a = {t.name: onnx.numpy_helper.to_array(t) for t in first.proto.graph.initializer}
    b = {t.name: onnx.numpy_helper.to_array(t) for t in again.proto.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_round_to_keeps_multiples(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 32))
    g.output(g.gemm(g.flatten(g.gap(g.relu(g.conv(y, 24)))), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.3, round_to=8)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 24
    assert weight(r.proto, convs[1].name).shape[0] == 16


def test_identity_shared_constants_from_the_torch_exporter(tmp_path):
    """torch shares identical initializers through Identity nodes; those layers must still be pruned."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    zero = g.const(np.zeros(8, np.float32))
    b1, b2 = g.op("Identity", [zero]), g.op("Identity", [zero])
    a = g.relu(g.op("Conv", ["x", g.weight([8, 3, 3, 3]), b1], pads=[1, 1, 1, 1]))
    b = g.relu(g.op("Conv", [a, g.weight([8, 8, 3, 3]), b2], pads=[1, 1, 1, 1]))
    g.output(g.gemm(g.flatten(g.gap(b)), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert r.report()["groups_pruned"] == 2
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 4 and weight(r.proto, convs[1].name).shape[0] == 4
