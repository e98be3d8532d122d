"""The rewrite stage alone: given an analysis and a hand-written plan (no scoring), the new model holds
exactly the kept slices, follows the declared fixups (shape constants), records what it removed,
and computes what the original computes with those channels zeroed at their source. No call to
``verify`` here: the expected outputs come from editing the original's weights with numpy."""

from __future__ import annotations

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import outputs, weight
from onnx import numpy_helper

from onnxprune import analyze, rewrite

REMOVED = [0, 2]
KEPT = [1, 3, 4, 5]


def _chain(reshapes: bool = False) -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 6))
    if reshapes:   # shape constants that name the channel count: the rewrite must edit them
        y = g.reshape(g.reshape(y, [1, 6, 64]), [1, 6, 8, 8])
    g.output(g.conv(y, 4, k=1))
    return g.build()


def _zeroed_at_source(model: onnx.ModelProto, conv: str, channels) -> onnx.ModelProto:
    """``model`` with the filters and biases of ``channels`` of node ``conv`` set to zero."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == conv)
    for init in out.graph.initializer:
        if init.name in node.input[1:]:
            v = numpy_helper.to_array(init).copy()
            v[list(channels)] = 0
            init.CopyFrom(numpy_helper.from_array(v, init.name))
    return out


def test_weights_lose_exactly_the_planned_slices():
    model = _chain()
    conv1, _, conv2 = (n.name for n in model.graph.node)
    an = analyze(model)
    before = model.SerializeToString()
    res = rewrite.apply(an, {an.groups[0].id: np.array(REMOVED)}, model)

    assert model.SerializeToString() == before                      # the original is not touched
    onnx.checker.check_model(res.proto, full_check=True)
    np.testing.assert_array_equal(weight(res.proto, conv1), weight(model, conv1)[KEPT])
    np.testing.assert_array_equal(weight(res.proto, conv1, 2), weight(model, conv1, 2)[KEPT])
    np.testing.assert_array_equal(weight(res.proto, conv2), weight(model, conv2)[:, KEPT])
    np.testing.assert_array_equal(weight(res.proto, conv2, 2), weight(model, conv2, 2))   # untouched
    assert res.kept_outputs[conv1].tolist() == KEPT and res.kept_inputs[conv2].tolist() == KEPT


def test_what_was_removed_is_recorded_per_tensor():
    model = _chain()
    conv_out, relu_out = model.graph.node[0].output[0], model.graph.node[1].output[0]
    an = analyze(model)
    res = rewrite.apply(an, {an.groups[0].id: np.array(REMOVED)}, model)

    assert {k: (a, p.tolist()) for k, (a, p) in res.removed_positions.items()} == \
        {conv_out: (1, REMOVED), relu_out: (1, REMOVED)}
    [entry] = res.groups
    assert entry["group"] == an.groups[0].id and entry["removed_channels"] == REMOVED
    assert {(t["tensor"], t["axis"]) for t in entry["tensors"]} == \
        {(m.tensor, m.axis) for m in an.groups[0].members}
    assert all(t["removed"] == REMOVED for t in entry["tensors"])


def test_an_empty_plan_gives_the_same_model():
    model = _chain()
    res = rewrite.apply(analyze(model), {}, model)
    assert res.removed_positions == {} and res.groups == []
    assert [list(t.dims) for t in res.proto.graph.initializer] == [list(t.dims) for t in model.graph.initializer]


def test_fixups_edit_shape_constants_and_the_output_matches_zeroed_channels():
    model = _chain(reshapes=True)
    conv1 = model.graph.node[0].name
    an = analyze(model)
    assert len(an.fixups) == 2                                   # one per Reshape that names 6 channels
    res = rewrite.apply(an, {an.groups[0].id: np.array(REMOVED)}, model)

    shapes = sorted(numpy_helper.to_array(t).tolist() for t in res.proto.graph.initializer
                    if t.data_type == onnx.TensorProto.INT64)
    assert shapes == [[1, 4, 8, 8], [1, 4, 64]]
    x = {"x": np.random.default_rng(0).standard_normal([1, 3, 8, 8]).astype(np.float32)}
    want = outputs(_zeroed_at_source(model, conv1, REMOVED), x)    # relu(0) = 0: zeroed = removed
    got = outputs(res.proto, x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert not np.allclose(outputs(model, x)[name], want[name], atol=1e-3)   # removal changed the output
