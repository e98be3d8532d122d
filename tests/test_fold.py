"""Constant folding before the analysis: what folds, what stays, and that the model computes the same."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import outputs, prune_model, weight
from onnx import numpy_helper

from onnxprune import ir
from onnxprune.fold import SMALL, fold_constants, fold_model


def _const_node(g, value):
    return g.op("Constant", [], value=numpy_helper.from_array(np.asarray(value)))


def _paddle_bias_model():
    """paddle2onnx style: the conv bias enters as Add(conv, Reshape(Constant, Constant))."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.conv("x", 8, bias=False)
    b = g.op("Reshape", [_const_node(g, np.linspace(-1, 1, 8, dtype=np.float32)),
                         _const_node(g, np.array([1, 8, 1, 1], np.int64))])
    y = g.relu(g.add(y, b))
    g.output(g.conv(y, 4))
    return g.build()


def _feed():
    return {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def test_reshaped_bias_becomes_an_initializer_and_computes_the_same():
    m = _paddle_bias_model()
    before = m.SerializeToString()
    folded, names = fold_constants(m)
    assert m.SerializeToString() == before       # the input is untouched
    assert len(names) == 1
    assert [n.op_type for n in folded.graph.node] == ["Conv", "Add", "Relu", "Conv"]
    init = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert init[names[0]].shape == (1, 8, 1, 1)
    onnx.checker.check_model(folded, full_check=True)
    a, b = outputs(m, _feed()), outputs(folded, _feed())
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_folded_bias_is_sliced_with_its_conv(tmp_path):
    r = prune_model(tmp_path, _paddle_bias_model(), ratio=0.5)
    assert not [grp for grp in r.analysis.frozen if grp.size > 1 and "output" not in grp.reasons[0]]
    conv = next(n for n in r.proto.graph.node if n.op_type == "Conv")
    assert weight(r.proto, conv.name).shape[0] == 4
    add = next(n for n in r.proto.graph.node if n.op_type == "Add")
    assert weight(r.proto, add.name).shape == (1, 4, 1, 1)


def test_a_shared_input_stays_for_its_other_users():
    g = GraphBuilder("x", [1, 8])
    c = g.const(np.arange(8, dtype=np.float32))
    y = g.add("x", g.op("Mul", [c, g.const(np.float32(2))]))
    g.output(g.add(y, c))                        # c is read directly too
    m = g.build()
    folded, names = fold_constants(m)
    assert len(names) == 1
    inits = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert np.array_equal(inits[c], np.arange(8))
    assert np.array_equal(inits[names[0]], 2 * np.arange(8))


def test_large_weights_fold_only_without_a_copy():
    n = int(np.sqrt(SMALL)) + 8                    # n * n > SMALL
    g = GraphBuilder("x", [1, n])
    w_alone = g.weight([n, n])
    w_shared = g.weight([n, n])
    y = g.op("MatMul", ["x", g.transpose(w_alone, [1, 0])])
    y = g.op("MatMul", [y, g.transpose(w_shared, [1, 0])])
    g.output(g.op("MatMul", [y, w_shared]))
    m = g.build()
    folded, names = fold_constants(m)
    assert len(names) == 1
    assert sum(n.op_type == "Transpose" for n in folded.graph.node) == 1
    kept = {t.name for t in folded.graph.initializer}
    assert w_alone not in kept and w_shared in kept
    assert sum(int(np.prod(t.dims)) for t in folded.graph.initializer) == 2 * n * n
    a, b = outputs(m, {"x": np.ones((1, n), np.float32)}), outputs(folded, {"x": np.ones((1, n), np.float32)})
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_quantization_graph_outputs_and_plain_models_are_left_alone(tmp_path):
    g = GraphBuilder("x", [1, 4])
    q = g.const(np.arange(4, dtype=np.int8))
    dq = g.op("DequantizeLinear", [q, g.const(np.float32(0.5)), g.const(np.int8(0))])
    y = g.add("x", dq)
    g.output(y)
    g.output(g.op("Neg", [g.const(np.ones(3, np.float32))]))    # a constant graph output
    w16 = g.const(np.ones((4, 32), np.float16))
    g.output(g.op("MatMul", ["x", g.op("Cast", [w16], to=onnx.TensorProto.FLOAT)]))   # stored as float16
    m = g.build()
    assert fold_constants(m) == (m, [])
    path = tmp_path / "m.onnx"
    onnx.save(_paddle_bias_model(), path)
    model = ir.load(path)
    assert fold_model(model).proto is not model.proto
    plain = GraphBuilder("x", [1, 3, 8, 8])
    plain.output(plain.conv("x", 4))
    onnx.save(plain.build(), path)
    model = ir.load(path)
    assert fold_model(model) is model
