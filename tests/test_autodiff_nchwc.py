"""Convolutions with fed weights lowered to onnxruntime's NCHWc kernels give the same loss and gradients."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import runtime
from onnxprune.train.autodiff import build_gradient_model
from onnxprune.train.autodiff import nchwc

BLOCK = nchwc.block_size()
pytestmark = pytest.mark.skipif(BLOCK == 0, reason="onnxruntime has no NCHWc kernels on this CPU")


def cnn(batch: int = 4) -> onnx.ModelProto:
    """stem (3 -> B channels: plain NCHW input), a stride-2 conv (B -> B+3: padded output block), a conv
    whose B+3 input channels are not whole blocks (kept as a plain Conv), then pool and classifier."""
    r = np.random.default_rng(0)
    b = BLOCK
    shapes = {"w1": (b, 3, 3, 3), "b1": (b,), "w2": (b + 3, b, 3, 3), "b2": (b + 3,), "w3": (4, b + 3, 1, 1),
              "fc": (4, 5)}
    inits = [numpy_helper.from_array((r.standard_normal(s) * 0.3).astype(np.float32), k) for k, s in shapes.items()]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3"], ["c3"]),
             helper.make_node("GlobalAveragePool", ["c3"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("MatMul", ["f", "fc"], ["logits"])]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 9, 9])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def lowered_convs(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node if n.domain == nchwc.DOMAIN and n.op_type == "Conv"]


def test_lowered_gradient_graph_matches_the_plain_one():
    model = cnn()
    weights = ["w1", "b1", "w2", "b2", "w3", "fc"]
    gm = build_gradient_model(model, weights, loss="cross_entropy", trainable_as_inputs=True)
    low = nchwc.lower(gm.proto)
    # the stem and the stride-2 conv, and the input gradient of the 1x1 conv (a Conv reading the 4-channel
    # output gradient: fewer channels than a block); the stride-2 input gradient stays a ConvTranspose
    assert len(lowered_convs(low)) == 3
    kept = [n for n in low.graph.node if n.op_type == "Conv" and n.domain == "" and n.input[1] == "w3"]
    assert kept, "a conv whose input channels are not whole blocks must stay a plain Conv"
    r = np.random.default_rng(1)
    feed = {"x": r.standard_normal((4, 3, 9, 9)).astype(np.float32),
            next(iter(gm.extra_inputs)): r.integers(0, 5, 4).astype(np.int64), **gm.param_values}
    fetch = [gm.loss_name] + [gm.grad_names[w] for w in weights]
    want = runtime.session(gm.proto).run(fetch, feed)
    got = runtime.session(low).run(fetch, feed)
    for name, a, b in zip(["loss"] + weights, got, want):
        assert np.abs(b).max() > 0, name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max(), err_msg=name)


def test_constant_weights_and_missing_kernels_leave_the_graph_alone():
    model = cnn()
    assert lowered_convs(nchwc.lower(model)) == []            # initializer weights: onnxruntime lays them out
    gm = build_gradient_model(model, ["w2"], loss="cross_entropy", trainable_as_inputs=True)
    same = nchwc.lower(gm.proto, block=0)
    assert same.SerializeToString() == gm.proto.SerializeToString() and same is not gm.proto
