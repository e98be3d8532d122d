"""Shape-moving ops: channels follow Transpose, Split, Slice, Reshape (fold, split, shuffle), Squeeze, Gather."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import attr, node, outputs, prune_model, weight


def test_nhwc_transposes_tf_style(tmp_path):
    g = GraphBuilder("x", [1, 8, 8, 3])                       # NHWC input, as TF exports have
    y = g.transpose("x", [0, 3, 1, 2])
    y = g.relu(g.conv(y, 8))
    y = g.transpose(y, [0, 2, 3, 1])                          # back to NHWC
    y = g.matmul(y, 6)                                        # Dense on the last axis
    y = g.relu(y)
    y = g.op("ReduceMean", [y], axes=[1, 2], keepdims=0)
    g.output(g.gemm(y, 4))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert weight(r.proto, node(r.proto, "Conv").name).shape[0] == 4
    assert weight(r.proto, node(r.proto, "MatMul").name).shape == (4, 3)


def test_split_and_slice_on_channel_axis(tmp_path):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    a, b = g.op("Split", [y, g.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    c = g.op("Slice", [y, g.const(np.array([2], np.int64)), g.const(np.array([6], np.int64)),
                       g.const(np.array([1], np.int64))])
    y = g.concat([g.conv(a, 4), g.conv(b, 4), g.conv(c, 4)])
    g.output(g.gemm(g.flatten(g.gap(y)), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    split = node(r.proto, "Split")
    sizes = onnx.numpy_helper.to_array(next(t for t in r.proto.graph.initializer if t.name == split.input[1]))
    assert sizes.sum() == 4 and (sizes >= 1).all()


def shuffle_net(batch=1):
    g = GraphBuilder("x", [batch, 3, 8, 8])
    a = g.relu(g.conv("x", 6))
    b = g.relu(g.conv(a, 6))
    y = g.concat([a, b])                                       # 12 channels
    y = g.reshape(y, [batch, 2, 6, 8, 8])
    y = g.transpose(y, [0, 2, 1, 3, 4])
    y = g.reshape(y, [batch, 12, 8, 8])
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 5))), 3))
    return g.build()


def test_channel_shuffle_rule_couples_the_aligned_halves():
    from onnxprune.analysis import analyze
    m = shuffle_net()
    groups = analyze(m).prunable                               # analysed as Reshape-Transpose-Reshape
    convs = [n.output[0] for n in m.graph.node if n.op_type == "Conv"][:2]
    (shared,) = [grp for grp in groups if all(any(mb.tensor == c for mb in grp.members) for c in convs)]
    assert shared.size == 6                                    # channel j of a and of b are one channel


def test_channel_shuffle_becomes_a_gather_and_halves_prune_independently(tmp_path):
    from onnxprune import canonical
    m = shuffle_net()
    cm, n = canonical.channel_shuffles(m)
    assert n == 1 and [x.op_type for x in cm.graph.node].count("Reshape") == 0
    feed = {"x": np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)}
    (before,), (after,) = outputs(m, feed).values(), outputs(cm, feed).values()
    np.testing.assert_array_equal(before, after)
    from onnxprune.analysis import analyze
    convs = [x.output[0] for x in cm.graph.node if x.op_type == "Conv"][:2]
    owners = [{grp.id for grp in analyze(cm).prunable if any(mb.tensor == c for mb in grp.members)} for c in convs]
    assert len(owners[0]) == len(owners[1]) == 1 and owners[0] != owners[1]   # a and b are separate groups now
    r = prune_model(tmp_path, m, ratio=0.5)                   # the pipeline canonicalises on load
    gather = node(r.proto, "Gather")
    perm = onnx.numpy_helper.to_array(next(t for t in r.proto.graph.initializer if t.name == gather.input[1]))
    assert sorted(perm.tolist()) == list(range(6))             # 3 kept of each half, still a permutation
    convs = [x for x in r.proto.graph.node if x.op_type == "Conv"]
    assert [weight(r.proto, c.name).shape[0] for c in convs[:2]] == [3, 3]


def test_shuffle_with_unknown_spatial_size_stays_as_is():
    from onnxprune import canonical
    m = shuffle_net()
    x = m.graph.input[0].type.tensor_type.shape.dim
    x[2].dim_param, x[3].dim_param = "H", "W"                  # nothing proves the Reshapes keep H and W
    del m.graph.value_info[:]
    assert canonical.channel_shuffles(m)[1] == 0


def test_shuffle_read_inside_a_subgraph_stays_as_is():
    from onnx import TensorProto, helper
    from onnxprune import canonical
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 6))
    mid = g.transpose(g.reshape(y, [1, 2, 3, 8, 8]), [0, 2, 1, 3, 4])
    out = g.reshape(mid, [1, 6, 8, 8])
    branch = helper.make_graph([helper.make_node("ReduceSum", [mid], ["s"], keepdims=0)], "b", [],
                               [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
    flag = g.const(np.array(True))
    side = g.op("If", [flag], then_branch=branch, else_branch=branch)   # reads `mid` from inside
    g.output(g.gemm(g.flatten(g.gap(out)), 2))
    g.output(side)
    m = g.build()
    assert canonical.channel_shuffles(m)[1] == 0


def test_shuffle_targets_computed_from_shape_are_removed_and_nothing_else():
    from onnxprune import canonical
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 6))
    dims = g.op("Shape", [y])                                  # [1, 6, 8, 8], computed at run time
    n, hw = (g.op("Slice", [dims, g.const(np.array([a], np.int64)), g.const(np.array([b], np.int64))])
             for a, b in ((0, 1), (2, 4)))
    split = g.op("Concat", [n, g.const(np.array([2, 3], np.int64)), hw], axis=0)
    merge = g.op("Concat", [n, g.const(np.array([6], np.int64)), hw], axis=0)
    z = g.op("Reshape", [g.transpose(g.op("Reshape", [y, split]), [0, 2, 1, 3, 4]), merge])
    g.op("Shape", ["x"], prefix="unused")                      # dead before canonicalisation: left alone
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [z])], axis=1)
    g.output(g.op("MatMul", [pooled, g.weight([6, 2])]))
    m = g.build()
    cm, n_done = canonical.channel_shuffles(m)
    assert n_done == 1
    ops = [x.op_type for x in cm.graph.node]
    assert ops.count("Shape") == 1 and "Concat" not in ops and "Slice" not in ops and "Reshape" not in ops
    onnx.checker.check_model(cm, full_check=True)
    feed = {"x": np.random.default_rng(1).standard_normal([1, 3, 8, 8]).astype(np.float32)}
    np.testing.assert_array_equal(*[list(outputs(p, feed).values())[0] for p in (m, cm)])


def test_shuffle_permutation_matches_numpy():
    from onnxprune.canonical import shuffle_permutation
    x = np.arange(12)
    np.testing.assert_array_equal(x.reshape(3, 4).T.reshape(-1), x[shuffle_permutation(12, 3)])


def test_dynamic_batch_flatten_through_computed_reshape(tmp_path):
    g = GraphBuilder("x", [2, 3, 8, 8], dynamic_batch=True)
    y = g.relu(g.conv("x", 8))
    y = g.gap(y)
    shape = g.op("Shape", ["x"])
    n = g.op("Gather", [shape, g.const(np.array(0, np.int64))], axis=0)
    target = g.op("Concat", [g.op("Unsqueeze", [n, g.const(np.array([0], np.int64))]),
                             g.const(np.array([-1], np.int64))], axis=0)
    y = g.op("Reshape", [y, target])                          # x.view(x.size(0), -1)
    g.output(g.gemm(y, 3) if False else g.op("MatMul", [y, g.weight([8, 3])]))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5, input_shapes={"x": [2, 3, 8, 8]})
    assert weight(r.proto, node(r.proto, "MatMul").name, 1).shape == (4, 3)
    # the batch dimension stays symbolic in the output model
    assert r.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_squeeze_unsqueeze_and_softmax_over_other_axis(tmp_path):
    g = GraphBuilder("x", [1, 3, 4, 4])
    y = g.relu(g.conv("x", 8))
    y = g.op("Softmax", [y], axis=3)                          # over width: fine
    y = g.op("GlobalMaxPool", [y])
    y = g.op("Squeeze", [y, g.const(np.array([2, 3], np.int64))])
    y = g.op("Unsqueeze", [y, g.const(np.array([1], np.int64))])   # [1, 1, 8]
    y = g.op("MatMul", [y, g.weight([8, 5])])
    g.output(y)
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert weight(r.proto, node(r.proto, "MatMul").name, 1).shape == (4, 5)


def test_gather_of_channels_by_constant_indices(tmp_path):
    g = GraphBuilder("x", [1, 3, 4, 4])
    y = g.relu(g.conv("x", 8))
    y = g.op("Gather", [y, g.const(np.array([7, 0, 3, 3, 5], np.int64))], axis=1)
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 4))), 2))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert r.report()["groups_pruned"] >= 1


def test_reduce_sum_over_channels_is_exact_but_mean_freezes(tmp_path):
    g = GraphBuilder("x", [1, 3, 4, 4])
    a = g.relu(g.conv("x", 8))
    b = g.relu(g.conv("x", 6))
    s = g.op("ReduceSum", [a, g.const(np.array([1], np.int64))], keepdims=1)
    mean = g.op("ReduceMean", [b], axes=[1], keepdims=1)
    g.output(g.add(s, mean))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 4
    assert weight(r.proto, convs[1].name).shape[0] == 6
    frozen = [f for f in r.report()["frozen"] if f["size"] == 6]
    assert frozen and "ReduceMean" in frozen[0]["reasons"][0]


def test_chunk_with_bounds_computed_from_the_channel_count(tmp_path):
    """torch's x.chunk(2, dim=1) exports Shape -> Gather -> Div -> Slice: the bounds are folded."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    y = g.relu(g.conv("x", 8))
    c = g.op("Gather", [g.op("Shape", [y]), g.const(np.array(1, np.int64))], axis=0)
    half = g.op("Unsqueeze", [g.op("Div", [c, g.const(np.array(2, np.int64))]), g.const(np.array([0], np.int64))])
    one = g.const(np.array([1], np.int64))
    a = g.op("Slice", [y, g.const(np.array([0], np.int64)), half, one])
    b = g.op("Slice", [y, half, g.const(np.array([2 ** 62], np.int64)), one])
    g.shapes[a] = g.shapes[b] = [1, 4, 8, 8]
    y = g.concat([g.conv(a, 4), g.conv(b, 4)])
    g.output(g.gemm(g.flatten(g.gap(y)), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5, input_shapes={"x": [2, 3, 8, 8]})
    first = [n for n in r.proto.graph.node if n.op_type == "Conv"][0]
    assert weight(r.proto, first.name).shape[0] == 4
    assert not any(n.op_type == "Shape" for n in r.proto.graph.node)   # folded into constant bounds


def test_channel_count_used_as_data_keeps_its_original_value(tmp_path):
    """A number computed from a channel count and used as data (here a divisor, like attention's
    1/sqrt(d)) keeps the value it had, so the pruned model equals its masked original."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    y = g.relu(g.conv("x", 8))
    c = g.op("Cast", [g.op("Gather", [g.op("Shape", [y]), g.const(np.array(1, np.int64))], axis=0)], to=1)
    y = g.op("Div", [y, c])                                   # divides by the channel count
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 4))), 3))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5)
    assert weight(r.proto, [n for n in r.proto.graph.node if n.op_type == "Conv"][0].name).shape[0] == 4
    div = node(r.proto, "Div")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in r.proto.graph.initializer}
    assert float(inits[div.input[1]]) == 8.0


def test_channel_count_mixed_with_batch_freezes(tmp_path):
    """A channel count multiplied by the batch size cannot become a constant: the channels stay."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    y = g.relu(g.conv("x", 8))
    s = g.op("Shape", [y])
    pick = [g.op("Gather", [s, g.const(np.array(i, np.int64))], axis=0) for i in (0, 1)]
    c = g.op("Cast", [g.op("Mul", pick)], to=1)
    y = g.op("Div", [y, c])
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 4))), 3))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    assert weight(r.proto, [n for n in r.proto.graph.node if n.op_type == "Conv"][0].name).shape[0] == 8
    frozen = next(f for f in r.report()["frozen"] if f["size"] == 8)
    assert any("combined with a value that changes with a symbolic input dimension" in x for x in frozen["reasons"]), frozen


def test_batch_sliced_from_a_shape_does_not_hold_the_channel_count(tmp_path):
    """paddle2onnx's flatten: Reshape(x, Concat(Slice(Shape(x), 0, 1), Cast([C]))) with a symbolic batch."""
    g = GraphBuilder("x", [2, 3, 8, 8], dynamic_batch=True)
    y = g.gap(g.relu(g.conv("x", 8)))
    shape = g.op("Shape", [y])
    batch = g.op("Slice", [shape, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                           g.const(np.array([0], np.int64))])
    width = g.op("Cast", [g.const(np.array([8], np.int32))], to=onnx.TensorProto.INT64)
    y = g.op("Reshape", [y, g.op("Concat", [batch, width], axis=0)])
    g.shapes[y] = [2, 8]
    g.output(g.op("MatMul", [y, g.weight([8, 3])]))
    m = g.build()
    r = prune_model(tmp_path, m, ratio=0.5, input_shapes={"x": [2, 3, 8, 8]})
    assert weight(r.proto, node(r.proto, "MatMul").name, 1).shape == (4, 3)
    assert r.proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert all("graph output" in f["reasons"][0] for f in r.report()["frozen"])
