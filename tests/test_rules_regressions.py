"""Regressions found by tools/bench_coverage.py on the model zoo, each reduced to a small graph."""

import numpy as np
import onnx
from builders import GraphBuilder
from onnx import TensorProto, helper

import onnxprune
from onnxprune import ir, runtime, verify
from onnxprune.data import random_feed


def _projection_block(channels: int):
    """Stem -> projection shortcut (first in node order) + bottleneck branch -> Add -> head."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    x = g.relu(g.conv("x", channels, k=3))
    shortcut = g.conv(x, channels, k=1, pad=0)
    y = g.conv(g.relu(g.conv(x, channels, k=1, pad=0)), channels, k=1, pad=0)
    y = g.relu(g.add(y, shortcut))
    g.output(g.gemm(g.flatten(g.gap(y)), 5))
    return g.build(), shortcut


def test_tap_lost_by_onnxruntime_layout_pass_still_verifies():
    """ResNet-50 at ratio 0.3 has 45 channels (64 -> 45) before its first projection shortcut.
    With that Conv's output exposed as a graph output (a verification tap) and not the Add's,
    onnxruntime 1.32's NCHWc layout pass drops the tensor and the session fails to load; the
    model without taps loads fine, so the verifier must still compare it."""
    m, shortcut = _projection_block(45)
    feeds = [random_feed(m, {"x": [1, 3, 8, 8]}, seed=s) for s in range(2)]
    ver = verify.compare(m, m, feeds, taps={shortcut: (shortcut, 1, np.array([], dtype=np.int64))})
    assert ver.passed, ver.error
    assert [o.name for o in ver.outputs if o.name == shortcut] == [shortcut]
    assert max(o.max_abs for o in ver.outputs) == 0.0


def test_verification_still_fails_when_the_candidate_itself_is_broken():
    """Loading the tapped pair without layout transforms must still fail a candidate that cannot load."""
    m, shortcut = _projection_block(45)
    broken = type(m)()
    broken.CopyFrom(m)
    broken.graph.node[2].input[1] = "missing_weight"
    feeds = [random_feed(m, {"x": [1, 3, 8, 8]}, seed=0)]
    ver = verify.compare(broken, m, feeds, taps={shortcut: (shortcut, 1, np.array([], dtype=np.int64))})
    assert not ver.passed and "missing_weight" in ver.error
    assert runtime.session(m) is not None


def test_outer_weight_read_by_both_if_branches_is_stored_once():
    """silero_vad: an LSTM weight read inside both branches of an If came back from the graph
    round trip as an initializer of each branch, so the pruned file grew by 19%."""
    w = onnx.numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w")
    branches = [helper.make_graph([helper.make_node("MatMul", ["x", "w"], [f"y{i}"])], f"b{i}", [],
                                  [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2, 4])])
                for i in range(2)]
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out = ir.from_graph(ir.to_graph(m), m)
    assert [t.name for t in out.graph.initializer] == ["w"]
    assert all(len(a.g.initializer) == 0 for a in out.graph.node[0].attribute)
    onnx.checker.check_model(out, full_check=True)
    x = np.ones((2, 3), np.float32)
    got = runtime.session(out).run(None, {"x": x, "c": np.array(True)})[0]
    np.testing.assert_array_equal(got, x @ onnx.numpy_helper.to_array(w))


def test_given_input_shape_does_not_bake_the_batch_into_folded_shape_arithmetic(tmp_path):
    """ch_ppocr_mobile_v2.0_cls (Paddle): Reshape(pool, Concat(Shape(pool)[:1], [C])) before the
    classifier. Analysed at a given --input-shape, the rewrite folded the shape to [1, C'] although
    the batch stays symbolic, so the pruned model no longer ran at batch 2."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    y = g.gap(g.relu(g.conv("x", 16)))
    batch = g.op("Slice", [g.op("Shape", [y]), g.const(np.array([0])), g.const(np.array([1]))])
    flat = g.op("Reshape", [y, g.op("Concat", [batch, g.const(np.array([16]))], axis=0)])
    g.output(g.op("Gemm", [flat, g.weight([5, 16]), g.const(np.zeros(5, np.float32))], transB=1))
    m = g.build()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.25), input_shapes={"x": [1, 3, 8, 8]})
    assert r.verification.passed
    onnx.checker.check_model(r.proto, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    assert runtime.session(r.proto).run(None, {"x": x})[0].shape == (2, 5)
    # the conv's channel count is read together with the batch: same decision as without the given shape
    r_default = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.25))
    assert r.report()["groups_pruned"] == r_default.report()["groups_pruned"]


def test_group_norm_with_one_group_exported_as_instance_norm_freezes_the_channels(tmp_path):
    """timm poolformer_s12: GroupNorm(1, C) exports as Reshape to [N, 1, C*H*W] ->
    InstanceNormalization -> Reshape back -> affine. The statistics then run over the channels,
    so the stream's channels must stay; passing them through failed verification."""
    g = GraphBuilder("x", [1, 3, 6, 6])
    y = g.relu(g.conv("x", 8))
    flat = g.op("Reshape", [y, g.const(np.array([1, 1, -1]))])
    normed = g.op("InstanceNormalization", [flat, g.const(np.ones(1, np.float32)),
                                            g.const(np.zeros(1, np.float32))], epsilon=1e-5)
    y = g.op("Reshape", [normed, g.const(np.array([1, 8, 6, 6]))])
    y = g.add(g.mul(y, g.weight([8, 1, 1])), g.weight([8, 1, 1]))
    g.shapes[y] = [1, 8, 6, 6]
    g.output(g.conv(g.relu(g.conv(y, 6)), 4))
    m = g.build()
    path = tmp_path / "m.onnx"
    onnx.save(m, path)
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.5))
    assert r.verification.passed
    first = next(grp for grp in r.analysis.groups if grp.size == 8)
    assert first.frozen and any("InstanceNormalization" in x for x in first.reasons)
    assert r.report()["groups_pruned"] == 1  # the 6-channel conv between the two plain convs
