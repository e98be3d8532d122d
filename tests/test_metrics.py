"""Exact params and MACs from ``counts.summarize`` on real graphs, checked against hand arithmetic."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import helper, numpy_helper

from onnxprune import ir
from onnxprune.measure import counts
from onnxprune.errors import OnnxPruneError


def only_layer(stats: counts.ModelStats) -> counts.LayerStats:
    assert len(stats.layers) == 1, stats.layers
    return stats.layers[0]


# ---------------------------------------------------------------- ResNet-18

def known(g: GraphBuilder, name: str, shape: list[int]) -> str:
    """Tell the builder a shape we already know, sparing it a shape-inference pass over 11 M weights."""
    g.shapes[name] = shape
    return name


def conv_bn(g: GraphBuilder, x: str, c: int, k: int, stride: int, relu: bool = True) -> str:
    n, _, h, w = g.shape(x)
    out = [n, c, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1]
    y = known(g, g.bn(known(g, g.conv(x, c, k=k, stride=stride, bias=False), out)), out)
    return known(g, g.relu(y), out) if relu else y


def basic_block(g: GraphBuilder, x: str, c: int, stride: int) -> str:
    y = conv_bn(g, conv_bn(g, x, c, 3, stride), c, 3, 1, relu=False)
    shortcut = conv_bn(g, x, c, 1, stride, relu=False) if stride != 1 or g.channels(x) != c else x
    return known(g, g.relu(g.add(y, shortcut)), g.shape(y))


@pytest.fixture(scope="module")
def resnet18() -> onnx.ModelProto:
    """torchvision's resnet18 topology at 1x3x224x224 (conv without bias, BN, ReLU)."""
    g = GraphBuilder("x", [1, 3, 224, 224])
    y = conv_bn(g, "x", 64, 7, 2)
    y = known(g, g.op("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), [1, 64, 56, 56])
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        y = basic_block(g, basic_block(g, y, c, stride), c, 1)
    g.output(g.gemm(known(g, g.flatten(g.gap(y)), [1, 512]), 1000))
    return g.build()


def test_resnet18_macs_and_params_match_hand_count(resnet18):
    stats = counts.summarize(resnet18)

    # MACs = Cout * Hout * Wout * Cin * k * k per conv (batch 1)
    stem = 64 * 112 * 112 * 3 * 7 * 7                        # 118,013,952
    layer1 = 4 * (64 * 56 * 56 * 64 * 9)                      # 4 convs 64->64 at 56x56: 462,422,016

    def stage(c: int, hw: int) -> int:                        # layers 2-4 all come to 411,041,792
        first = c * hw * hw * (c // 2) * 9                    # 3x3/2 conv, c/2 -> c
        rest = 3 * (c * hw * hw * c * 9)                      # three 3x3 convs c -> c
        projection = c * hw * hw * (c // 2)                   # 1x1/2 shortcut
        return first + rest + projection

    fc = 512 * 1000
    expected_macs = stem + layer1 + stage(128, 28) + stage(256, 14) + stage(512, 7) + fc
    assert stage(128, 28) == stage(256, 14) == stage(512, 7) == 411_041_792
    assert expected_macs == 1_814_073_344  # torchvision / fvcore: 1.81 GMACs
    assert stats.macs == expected_macs
    assert sum(layer.macs for layer in stats.layers) == expected_macs
    assert len(stats.layers) == 21  # 17 3x3/7x7 convs + 3 projections + fc

    conv_weights = (64 * 3 * 49 + 4 * 64 * 64 * 9
                    + sum(c * (c // 2) * 9 + 3 * c * c * 9 + c * (c // 2) for c in (128, 256, 512)))
    fc_params = 512 * 1000 + 1000
    bn_channels = 64 + 4 * 64 + sum(5 * c for c in (128, 256, 512))  # 20 BN layers, 4,800 channels
    torch_params = conv_weights + fc_params + 2 * bn_channels          # weight + bias per BN channel
    assert torch_params == 11_689_512
    # running mean and variance are constants in ONNX, so they count too
    assert stats.params == torch_params + 2 * bn_channels == 11_699_112
    assert sum(layer.params for layer in stats.layers) == conv_weights + fc_params

    fc_layer = stats.layers[-1]
    assert (fc_layer.op, fc_layer.weight_shape, fc_layer.params, fc_layer.output_shape) == \
        ("Gemm", [1000, 512], 513_000, [1, 1000])
    assert stats.layers[0].output_shape == [1, 64, 112, 112]


# ---------------------------------------------------------------- Conv family

def test_strided_dilated_padded_conv():
    g = GraphBuilder("x", [1, 3, 17, 19])
    g.output(g.conv("x", 8, k=3, stride=2, dilation=2, pad=1))
    layer = only_layer(counts.summarize(g.build()))
    # effective kernel 5: H = (17 + 2 - 5) // 2 + 1 = 8, W = (19 + 2 - 5) // 2 + 1 = 9
    assert layer.output_shape == [1, 8, 8, 9]
    assert layer.macs == 8 * 8 * 9 * 3 * 3 * 3
    assert layer.params == 8 * 3 * 3 * 3 + 8


def test_asymmetric_pads_and_auto_pad():
    g = GraphBuilder("x", [2, 4, 11, 11])
    a = g.op("Conv", ["x", g.weight([6, 4, 3, 3])], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 0])
    b = g.op("Conv", ["x", g.weight([6, 4, 2, 2])], kernel_shape=[2, 2], strides=[3, 3], auto_pad="SAME_UPPER")
    g.output(a)
    g.output(b)
    first, second = counts.summarize(g.build()).layers
    # H = (11 + 0 + 2 - 3) // 2 + 1 = 6, W = (11 + 1 + 0 - 3) // 2 + 1 = 5
    assert first.output_shape == [2, 6, 6, 5]
    assert first.macs == 2 * 6 * 6 * 5 * 4 * 9
    assert second.output_shape == [2, 6, 4, 4]  # SAME_UPPER: ceil(11 / 3)
    assert second.macs == 2 * 6 * 4 * 4 * 4 * 4
    assert second.params == 6 * 4 * 2 * 2  # no bias input


@pytest.mark.parametrize("group, cout", [(4, 16), (8, 8)], ids=["grouped", "depthwise"])
def test_grouped_and_depthwise_conv(group, cout):
    g = GraphBuilder("x", [1, 8, 10, 10])
    g.output(g.conv("x", cout, k=3, group=group))
    layer = only_layer(counts.summarize(g.build()))
    assert layer.weight_shape == [cout, 8 // group, 3, 3]
    assert layer.macs == cout * 10 * 10 * (8 // group) * 9
    assert layer.params == cout * (8 // group) * 9 + cout


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    g = GraphBuilder("x", [2, 4, 5, 5])
    g.output(g.conv_transpose("x", 6, k=3, stride=2, group=group))
    layer = only_layer(counts.summarize(g.build()))
    assert layer.output_shape == [2, 6, 11, 11]  # (5 - 1) * 2 + 3
    # every input pixel of every input channel scatters into Cout/group * k * k outputs
    assert layer.macs == 2 * 4 * 5 * 5 * (6 // group) * 3 * 3
    assert layer.params == 4 * (6 // group) * 9 + 6


# ---------------------------------------------------------------- Gemm / MatMul

@pytest.mark.parametrize("trans_a, trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_gemm_transposes(trans_a, trans_b):
    m, k, n = 3, 5, 4
    g = GraphBuilder("a", [k, m] if trans_a else [m, k])
    w = g.weight([n, k] if trans_b else [k, n])
    g.output(g.op("Gemm", ["a", w, g.const(np.zeros(n, np.float32))], transA=trans_a, transB=trans_b))
    layer = only_layer(counts.summarize(g.build()))
    assert layer.output_shape == [m, n]
    assert layer.macs == m * n * k
    assert layer.params == k * n + n


def test_gemm_with_constant_first_operand():
    g = GraphBuilder("b", [5, 7])
    g.output(g.op("Gemm", [g.weight([3, 5]), "b"]))
    layer = only_layer(counts.summarize(g.build()))
    assert (layer.weight_shape, layer.macs, layer.params) == ([3, 5], 3 * 7 * 5, 15)


def test_batched_matmul_broadcasts_and_takes_its_bias():
    g = GraphBuilder("a", [2, 1, 3, 5])
    g.output(g.op("Add", [g.op("MatMul", ["a", g.weight([4, 5, 6])]), g.const(np.ones(6, np.float32))]))
    layer = only_layer(counts.summarize(g.build()))
    assert layer.output_shape == [2, 4, 3, 6]
    assert layer.macs == 2 * 4 * 3 * 6 * 5
    assert layer.params == 4 * 5 * 6 + 6


def test_matmul_of_two_activations_counts_macs_without_params():
    """Attention: scores = Q @ K^T and out = scores @ V, all activations; Q/K/V come from weights."""
    g = GraphBuilder("x", [1, 2, 3, 8])  # batch, heads, tokens, head dim
    q = g.op("MatMul", ["x", g.weight([8, 8])])
    k = g.op("MatMul", ["x", g.weight([8, 8])])
    scores = g.op("MatMul", [q, g.transpose(k, [0, 1, 3, 2])])
    g.output(g.op("MatMul", [g.op("Softmax", [scores], axis=-1), "x"]))
    stats = counts.summarize(g.build())
    proj = 2 * 3 * 8 * 8
    qk, av = 2 * 3 * 3 * 8, 2 * 3 * 8 * 3
    assert [layer.macs for layer in stats.layers] == [proj, proj, qk, av]
    assert stats.macs == 2 * proj + qk + av
    assert [layer.weight for layer in stats.layers[2:]] == ["", ""]
    assert [layer.params for layer in stats.layers[2:]] == [0, 0]
    assert len(stats.weight_layers) == 2 and stats.params == 2 * 64


def test_vector_matmul():
    g = GraphBuilder("v", [5])
    g.output(g.op("MatMul", ["v", g.weight([5, 4])]))
    layer = only_layer(counts.summarize(g.build()))
    assert (layer.output_shape, layer.macs) == ([4], 4 * 5)


# ---------------------------------------------------------------- where weights live

def test_constant_node_weight_as_paddle_exports_it():
    w = np.ones((4, 3, 3, 3), np.float32)
    g = GraphBuilder("x", [1, 3, 6, 6])
    g.nodes.append(helper.make_node("Constant", [], ["conv_w"], value=numpy_helper.from_array(w, "conv_w")))
    g.nodes.append(helper.make_node("Constant", [], ["conv_b"], value_floats=[0.0] * 4))
    g.nodes.append(helper.make_node("Constant", [], ["scale"], value_float=2.0))  # scalar: not a param
    y = g.op("Conv", ["x", "conv_w", "conv_b"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    g.output(g.mul(y, "scale"))
    stats = counts.summarize(g.build())
    layer = only_layer(stats)
    assert (layer.weight, layer.weight_shape, layer.params) == ("conv_w", [4, 3, 3, 3], 108 + 4)
    assert layer.macs == 4 * 6 * 6 * 3 * 9
    assert stats.params == 108 + 4


def test_weight_through_identity_and_shared_initializer_counts_once():
    g = GraphBuilder("x", [2, 6])
    w = g.weight([6, 6])
    alias = g.op("Identity", [w])
    y = g.op("MatMul", [g.op("MatMul", ["x", w]), alias])
    g.output(g.op("MatMul", [y, w]))
    stats = counts.summarize(g.build())
    assert [layer.weight for layer in stats.layers] == [w, w, w]
    assert [layer.params for layer in stats.layers] == [36, 36, 36]
    assert stats.params == 36
    assert stats.macs == 3 * (2 * 6 * 6)


def test_params_skip_integer_and_scalar_constants():
    g = GraphBuilder("x", [1, 4, 2, 2])
    y = g.reshape(g.conv("x", 4, k=1, bias=False), [1, 16])           # int64 shape tensor
    y = g.mul(y, g.const(np.float32(3.0)))                             # float scalar
    shift = g.op("Cast", [g.const(np.zeros((1, 16), np.float64))], to=onnx.TensorProto.FLOAT)
    g.output(g.add(y, shift))                                          # double, rank 2: counts
    stats = counts.summarize(g.build())
    assert stats.params == 16 + 16


# ---------------------------------------------------------------- shapes

def test_dynamic_batch_follows_input_shapes():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    g.output(g.gemm(g.flatten(g.gap(g.conv("x", 4, k=3))), 5))
    model = g.build()
    one = counts.summarize(model)
    four = counts.summarize(model, {"x": [4, 3, 8, 8]})
    per_image = 4 * 8 * 8 * 3 * 9 + 5 * 4
    assert one.macs == per_image and four.macs == 4 * per_image
    assert four.layers[0].output_shape == [4, 4, 8, 8]
    assert four.params == one.params == 4 * 27 + 4 + 5 * 4 + 5


def test_input_shapes_are_checked():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    g.output(g.conv("x", 4))
    model = g.build()
    with pytest.raises(OnnxPruneError, match="model's inputs are: x"):
        counts.summarize(model, {"y": [1, 3, 8, 8]})
    with pytest.raises(OnnxPruneError, match="conflicts"):
        counts.summarize(model, {"x": [1, 3, 9, 8]})


def float_reshape_model() -> tuple[onnx.ModelProto, str, str]:
    """Reshape to a shape computed in float: ONNX inference gives up on everything after it."""
    g = GraphBuilder("x", [2, 3, 8, 8])
    target = g.op("Mul", [g.op("Cast", [g.op("Shape", ["x"])], to=onnx.TensorProto.FLOAT),
                          g.const(np.array([1, 1, 0.5, 2], np.float32))])
    r = g.op("Reshape", ["x", g.op("Cast", [target], to=onnx.TensorProto.INT64)])  # (2, 3, 4, 16)
    y = g.op("MatMul", [r, g.weight([16, 5])])
    g.output(y)
    return g.build(), r, y


def test_shape_inference_gap_is_filled_by_onnxruntime():
    model, _, y = float_reshape_model()
    assert ir.infer_shapes(model)[y] == [None, None, None, 5]
    stats = counts.summarize(model)
    layer = only_layer(stats)
    assert layer.output_shape == [2, 3, 4, 5]
    assert layer.macs == 2 * 3 * 4 * 5 * 16
    assert stats.params == 16 * 5 + 4  # the float multiplier is a float constant too


def test_onnxruntime_fallback_ignores_recorded_shapes():
    model, r, y = float_reshape_model()
    for i, symbol in ((0, "N"), (2, "H")):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = symbol
    recorded = [onnx.helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, [2, 3, 4, 16])]
    model.graph.value_info.extend(recorded)  # what an exporter run at 2x3x8x8 would have written
    layer = only_layer(counts.summarize(model, {"x": [4, 3, 16, 8]}))
    assert layer.output_shape == [4, 3, 8, 5]
    assert layer.macs == 4 * 3 * 8 * 5 * 16


def symbolic_hw_model() -> onnx.ModelProto:
    """Exported at 8x8, then made dynamic in batch, height and width: value_info still says 8x8."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    g.output(g.gap(g.conv("x", 4, k=3)))
    model = g.build()
    for i, symbol in ((0, "N"), (2, "H"), (3, "W")):
        model.graph.input[0].type.tensor_type.shape.dim[i].dim_param = symbol
    assert any(vi.type.tensor_type.shape.dim[2].dim_value == 8 for vi in model.graph.value_info)
    return model


def test_recorded_shapes_do_not_override_the_given_input_shape():
    model = symbolic_hw_model()
    layer = only_layer(counts.summarize(model, {"x": [2, 3, 16, 16]}))
    assert layer.output_shape == [2, 4, 16, 16]
    assert layer.macs == 2 * 4 * 16 * 16 * 3 * 9
    assert only_layer(counts.summarize(model)).macs == 4 * 1 * 1 * 3 * 9  # symbolic sizes taken as 1
