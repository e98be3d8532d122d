"""Reverse-mode gradient graphs checked against central finite differences run in onnxruntime.

Each rule gets a tiny graph with one op whose float inputs are graph inputs; the
op's outputs are multiplied by fixed random tensors and summed, so every output
element carries a different upstream gradient. Graphs are float64 where
onnxruntime has a double kernel, float32 (larger steps, looser tolerance) where not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

from onnxprune import ir, runtime
from onnxprune.train.autodiff import BACKWARD, build_gradient_model
from onnxprune.errors import OnnxPruneError

F64, F32 = np.float64, np.float32
RNG = np.random.default_rng(1234)


def rand(*shape, dtype=F64, low=None, high=None):
    if low is not None:
        return RNG.uniform(low, high, shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def ints(*values):
    return np.array(values, dtype=np.int64)


@dataclass
class Case:
    """One op with its inputs: float arrays listed in ``wrt`` are graph inputs, the rest initializers."""

    op: str
    ins: list[str]
    arrays: dict[str, np.ndarray]
    wrt: list[str]
    attrs: dict = field(default_factory=dict)
    opset: int = 17
    n_out: int = 1


def _elem(a: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(a.dtype)


def op_model(case: Case) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(case.n_out)]
    inputs = [helper.make_tensor_value_info(n, _elem(case.arrays[n]), case.arrays[n].shape) for n in case.wrt]
    inits = [numpy_helper.from_array(a, n) for n, a in case.arrays.items() if n not in case.wrt]
    nodes = [helper.make_node(case.op, case.ins, outs, name="op", **case.attrs)]
    graph = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info(o, 0, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8
    return model


def weigh(model: onnx.ModelProto) -> tuple[onnx.ModelProto, np.dtype]:
    """``model`` with each output times a fixed random tensor, all summed into the scalar output 'out'."""
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = model.graph
    types = {vi.name: vi.type.tensor_type for vi in graph.output}
    outs = [vi.name for vi in graph.output]
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(types[outs[0]].elem_type))
    del graph.output[:]
    sums = []
    for o in outs:
        shape = [d.dim_value for d in types[o].shape.dim]
        weight = numpy_helper.from_array(rand(*shape, dtype=dtype), f"r_{o}")
        graph.initializer.append(weight)
        graph.node.append(helper.make_node("Mul", [o, weight.name], [f"m_{o}"]))
        graph.node.append(helper.make_node("ReduceSum", [f"m_{o}"], [f"s_{o}"], keepdims=0))
        sums.append(f"s_{o}")
    graph.node.append(helper.make_node("Sum", sums, ["out"]))
    graph.output.append(helper.make_tensor_value_info("out", types[outs[0]].elem_type, []))
    onnx.checker.check_model(model, full_check=True)
    return model, dtype


def finite_differences(model: onnx.ModelProto, feeds: dict, name: str, eps: float) -> np.ndarray:
    sess = runtime.session(model)
    x = feeds[name]
    grad = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fp = float(sess.run(["out"], {**feeds, name: plus})[0].astype(F64))
        fm = float(sess.run(["out"], {**feeds, name: minus})[0].astype(F64))
        grad[idx] = (fp - fm) / (float(plus[idx]) - float(minus[idx]))
    return grad


def gradients(model: onnx.ModelProto, feeds: dict, wrt: list[str], loss: str = "sum", output: str = "out",
              **kw) -> dict[str, np.ndarray]:
    gm = build_gradient_model(model, wrt, loss=loss, output=output, **kw)
    onnx.checker.check_model(gm.proto, full_check=True)
    sess = runtime.session(gm.proto)
    names = [gm.grad_names[t] for t in wrt]
    return dict(zip(wrt, sess.run(names, feeds)))


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want), initial=0.0) / max(np.max(np.abs(want), initial=0.0), 1e-2))


def check_model(model: onnx.ModelProto, feeds: dict, wrt: list[str], what: str = "") -> None:
    """Gradients of the weighted sum of ``model``'s outputs w.r.t. graph inputs ``wrt`` equal finite differences."""
    weighted, dtype = weigh(model)
    got = gradients(weighted, feeds, wrt)
    eps, tol = (1e-6, 1e-6) if dtype == F64 else (1e-2, 3e-4)
    for name in wrt:
        want = finite_differences(weighted, feeds, name, eps)
        assert np.abs(want).max() > 0, f"{name}: finite differences are all zero, the test checks nothing"
        err = relative_error(got[name], want)
        assert err < tol, f"{what} d/d{name}: relative error {err:.2e}\ngot\n{got[name]}\nwant\n{want}"


def check(case: Case) -> None:
    check_model(op_model(case), {n: case.arrays[n] for n in case.wrt}, case.wrt, case.op)


# ------------------------------------------------------------------ per-rule cases
def conv_case(x, w, b=True, **attrs):
    arrays = {"x": rand(*x, dtype=F32), "w": rand(*w, dtype=F32)}
    if b:
        arrays["b"] = rand(w[0], dtype=F32)
    return Case("Conv", list(arrays), arrays, list(arrays), attrs)


def conv_t_case(x, w, group=1, **attrs):
    arrays = {"x": rand(*x, dtype=F32), "w": rand(*w, dtype=F32), "b": rand(w[1] * group, dtype=F32)}
    return Case("ConvTranspose", list(arrays), arrays, list(arrays), dict(group=group, **attrs))


def unary(op, shape=(2, 3, 4), dtype=F64, low=None, high=None, opset=17, kinks=(), **attrs):
    """One input; values within 0.05 of a kink are moved off it, as float32 steps are 1e-2 wide."""
    x = rand(*shape, dtype=dtype, low=low, high=high)
    for kink in kinks:
        x = np.where(np.abs(x - kink) < 0.05, x + 0.1, x).astype(dtype)
    return Case(op, ["x"], {"x": x}, ["x"], attrs, opset=opset)


def binary(op, a, b, positive_b=False):
    arrays = {"a": rand(*a), "b": rand(*b, low=0.5, high=2.0) if positive_b else rand(*b)}
    return Case(op, ["a", "b"], arrays, ["a", "b"])


def gemm_case(a, b, c=None, **attrs):
    arrays = {"a": rand(*a), "b": rand(*b)}
    if c is not None:
        arrays["c"] = rand(*c)
    return Case("Gemm", list(arrays), arrays, list(arrays), attrs)


def with_consts(op, shape, consts: dict, dtype=F64, opset=17, n_out=1, wrt=("x",), **attrs):
    arrays = {"x": rand(*shape, dtype=dtype), **consts}
    ins = ["x"] + [k if v is not None else "" for k, v in consts.items()]
    while ins[-1] == "":
        ins.pop()
    arrays = {k: v for k, v in arrays.items() if v is not None}
    return Case(op, ins, arrays, list(wrt), attrs, opset=opset, n_out=n_out)


def pool(op, shape=(1, 2, 6, 6), dtype=F32, **attrs):
    return unary(op, shape, dtype=dtype, **attrs)


def distinct_max(x: np.ndarray) -> np.ndarray:
    """Raise each channel's maximum by 0.5, so no 1e-2 step changes which element is largest."""
    flat = x.reshape(x.shape[0] * x.shape[1], -1)
    flat[np.arange(len(flat)), flat.argmax(1)] += 0.5
    return x


def resize(shape, scales=None, sizes=None, **attrs):
    consts = {"roi": np.zeros(0, F32), "scales": np.array(scales, F32) if scales else np.zeros(0, F32)}
    if sizes:
        consts["sizes"] = np.array(sizes, np.int64)
    return with_consts("Resize", shape, consts, dtype=F32, **attrs)


def slice_case(shape, starts, ends, axes=None, steps=None):
    consts = {"starts": ints(*starts), "ends": ints(*ends), "axes": axes and ints(*axes),
              "steps": steps and ints(*steps)}
    return with_consts("Slice", shape, consts)


def pad_case(pads, mode="constant"):
    return with_consts("Pad", (1, 2, 4, 5), {"pads": ints(*pads)}, mode=mode)


def bn_case(shape):
    c = shape[1]
    arrays = {"x": rand(*shape), "scale": rand(c), "bias": rand(c), "mean": rand(c),
              "var": rand(c, low=0.5, high=1.5)}
    return Case("BatchNormalization", list(arrays), arrays, list(arrays), dict(epsilon=1e-3))


def ln_case(shape, scale_shape, axis=-1):
    arrays = {"x": rand(*shape), "scale": rand(*scale_shape), "bias": rand(*scale_shape)}
    return Case("LayerNormalization", list(arrays), arrays, list(arrays), dict(axis=axis))


def matmul_case(a, b):
    arrays = {"a": rand(*a), "b": rand(*b)}
    return Case("MatMul", ["a", "b"], arrays, ["a", "b"])


CASES = {
    "conv": conv_case((2, 3, 5, 5), (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    "conv-stride-asym-pad": conv_case((1, 2, 7, 6), (3, 2, 3, 2), strides=[2, 2], pads=[0, 1, 1, 0]),
    "conv-dilation": conv_case((1, 2, 7, 7), (2, 2, 3, 3), dilations=[2, 2], pads=[1, 2, 2, 1]),
    "conv-wide-strided": conv_case((1, 8, 5, 4), (3, 8, 3, 3), strides=[2, 1], pads=[1, 1, 0, 1]),
    "conv-1x1-one-channel": conv_case((2, 1, 4, 4), (3, 1, 1, 1), strides=[2, 2]),
    "conv-stride3-asym-pad": conv_case((1, 2, 10, 9), (3, 2, 4, 3), strides=[3, 3], pads=[2, 0, 1, 2]),
    "conv-group": conv_case((2, 4, 5, 5), (6, 2, 3, 3), group=2, strides=[2, 1], pads=[1, 1, 1, 1]),
    "conv-group-stride1": conv_case((1, 4, 5, 4), (6, 2, 3, 1), group=2, pads=[1, 0, 0, 0]),
    "conv-depthwise-stride1": conv_case((2, 3, 5, 5), (3, 1, 3, 3), group=3, dilations=[1, 2], pads=[1, 2, 1, 2]),
    "conv-depthwise": conv_case((1, 3, 6, 6), (3, 1, 3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv-big-kernel-group": conv_case((2, 4, 3, 40), (4, 2, 2, 13), group=2, strides=[1, 3], pads=[0, 2, 1, 1]),
    "conv-no-bias-1d": conv_case((2, 2, 9), (3, 2, 4), b=False, strides=[3], pads=[2, 0]),
    "conv-same-upper": conv_case((1, 2, 6, 5), (2, 2, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "convtranspose": conv_t_case((1, 3, 3, 3), (3, 2, 2, 2), strides=[2, 2]),
    "convtranspose-pad-outpad": conv_t_case((2, 2, 3, 4), (2, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
                                            output_padding=[1, 0]),
    "convtranspose-big-kernel": conv_t_case((1, 2, 5), (2, 3, 27), strides=[4], pads=[3, 2]),
    "convtranspose-group-dilation": conv_t_case((1, 4, 3, 3), (4, 1, 3, 3), group=2, dilations=[2, 2]),
    "gemm": gemm_case((3, 4), (4, 5), (5,)),
    "gemm-transA": gemm_case((4, 3), (4, 5), (3, 5), transA=1, alpha=0.5),
    "gemm-transB-beta": gemm_case((3, 4), (5, 4), (1,), transB=1, beta=2.0),
    "gemm-transAB-noC": gemm_case((4, 3), (5, 4), transA=1, transB=1, alpha=1.5),
    "matmul-batched": matmul_case((2, 3, 4), (4, 5)),
    "matmul-broadcast": matmul_case((2, 1, 3, 4), (3, 4, 2)),
    "matmul-vec-left": matmul_case((4,), (2, 4, 3)),
    "matmul-vec-right": matmul_case((2, 3, 4), (4,)),
    "matmul-dot": matmul_case((4,), (4,)),
    "batchnorm": bn_case((2, 3, 4, 4)),
    "batchnorm-2d": bn_case((4, 3)),
    "layernorm": ln_case((2, 3, 4), (4,)),
    "layernorm-axis1": ln_case((2, 3, 4), (3, 4), axis=1),
    "relu": unary("Relu"),
    "leakyrelu": unary("LeakyRelu", alpha=0.1),
    "clip": with_consts("Clip", (3, 4), {"lo": np.array(-0.5), "hi": np.array(0.7)}),
    "clip-min-only": with_consts("Clip", (3, 4), {"lo": np.array(0.1)}),
    "sigmoid": unary("Sigmoid"),
    "hardsigmoid": unary("HardSigmoid", dtype=F32, low=-4, high=4, kinks=(-1.6, 2.4), alpha=0.25, beta=0.4),
    "hardswish": unary("HardSwish", dtype=F32, low=-5, high=5, kinks=(-3, 3)),
    "tanh": unary("Tanh"),
    "erf": unary("Erf", dtype=F32),
    "gelu": unary("Gelu", dtype=F32, opset=20),
    "gelu-tanh": unary("Gelu", dtype=F32, opset=20, approximate="tanh"),
    "softmax": unary("Softmax"),
    "softmax-axis1": unary("Softmax", axis=1),
    "logsoftmax": unary("LogSoftmax", axis=0),
    "neg": unary("Neg"),
    "identity": unary("Identity"),
    "dropout": unary("Dropout"),
    "prelu": binary("PRelu", (2, 3, 4), (3, 1)),
    "sqrt": unary("Sqrt", low=0.5, high=2.0),
    "exp": unary("Exp"),
    "log": unary("Log", low=0.5, high=2.0),
    "reciprocal": unary("Reciprocal", low=0.5, high=2.0),
    "abs": unary("Abs"),
    "pow": Case("Pow", ["a", "b"], {"a": rand(2, 3, low=0.5, high=2.0), "b": rand(3)}, ["a", "b"]),
    "where": Case("Where", ["c", "a", "b"],
                  {"c": np.array([[True, False, True], [False, True, True]]), "a": rand(3), "b": rand(2, 1)},
                  ["a", "b"]),
    "reducemax": unary("ReduceMax", (2, 3, 4), axes=[1], keepdims=0),
    "reducemin-opset18": with_consts("ReduceMin", (2, 3, 4), {"axes": ints(0, 2)}, opset=18),
    "add-broadcast": binary("Add", (2, 3, 4), (3, 1)),
    "add-both-sides": binary("Add", (1, 4), (2, 3, 1)),
    "sub-broadcast": binary("Sub", (3, 1), (2, 3, 4)),
    "mul-broadcast": binary("Mul", (2, 1, 4), (3, 1)),
    "mul-scalar": binary("Mul", (2, 3), ()),
    "div-broadcast": binary("Div", (2, 3, 4), (1, 4), positive_b=True),
    "div-both-sides": binary("Div", (3, 1), (2, 1, 4), positive_b=True),
    "sum-variadic": Case("Sum", ["a", "b", "c"], {"a": rand(2, 3), "b": rand(3), "c": rand(2, 1)},
                         ["a", "b", "c"]),
    "concat": Case("Concat", ["a", "b", "c"], {"a": rand(2, 1, 3), "b": rand(2, 3, 3), "c": rand(2, 2, 3)},
                   ["a", "b", "c"], dict(axis=1)),
    "split-sizes": with_consts("Split", (2, 5, 3), {"split": ints(2, 3)}, n_out=2, axis=1),
    "split-num-outputs": with_consts("Split", (6, 2), {}, n_out=3, opset=18, axis=0, num_outputs=3),
    "slice": slice_case((4, 5, 3), [1, -4], [3, 1000], [0, 1]),
    "slice-steps-negative": slice_case((5, 6, 3), [-1, 0, 2], [-6, 6, 0], [0, 1, -1], [-2, 2, -1]),
    "reshape": with_consts("Reshape", (2, 3, 4), {"shape": ints(4, -1)}),
    "flatten": unary("Flatten", (2, 3, 2, 2), axis=2),
    "transpose": unary("Transpose", (2, 3, 4), perm=[2, 0, 1]),
    "squeeze": with_consts("Squeeze", (2, 1, 3, 1), {"axes": ints(1, -1)}),
    "unsqueeze": with_consts("Unsqueeze", (2, 3), {"axes": ints(0, 3)}),
    "maxpool": pool("MaxPool", dtype=F64, kernel_shape=[2, 2], strides=[2, 2]),
    "maxpool-1d-leftover": pool("MaxPool", (2, 3, 8), dtype=F64, kernel_shape=[3], strides=[3]),
    "maxpool-pad-overlap": pool("MaxPool", (1, 2, 7, 7), dtype=F64, kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]),
    "maxpool-dilation-ceil": pool("MaxPool", (1, 2, 8, 8), dtype=F64, kernel_shape=[2, 2], strides=[3, 3],
                                  dilations=[2, 2], ceil_mode=1),
    "maxpool-opset13-overlap": pool("MaxPool", (1, 1, 5, 5), dtype=F64, kernel_shape=[3, 3], strides=[1, 1],
                                    opset=13),
    "avgpool": pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "avgpool-pad-exclude": pool("AveragePool", (1, 2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 1, 1, 1]),
    "avgpool-pad-include": pool("AveragePool", (1, 2, 5, 5), kernel_shape=[3, 3], strides=[2, 2],
                                pads=[1, 0, 1, 2], count_include_pad=1),
    "avgpool-ceil": pool("AveragePool", (1, 1, 7, 7), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    "globalavgpool": pool("GlobalAveragePool"),
    "globalmaxpool": Case("GlobalMaxPool", ["x"], {"x": distinct_max(rand(1, 2, 6, 6, dtype=F32))}, ["x"]),
    "reducemean": unary("ReduceMean", (2, 3, 4), axes=[1, -1], keepdims=0),
    "reducemean-opset18": with_consts("ReduceMean", (2, 3, 4), {"axes": ints(0)}, opset=18),
    "reducesum-all": unary("ReduceSum", (2, 3), keepdims=0),
    "resize-nearest-asymmetric": resize((1, 2, 3, 4), [1, 1, 2, 2], mode="nearest",
                                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    "resize-nearest-up3-half-pixel": resize((1, 2, 3, 2), [1, 1, 3, 3], mode="nearest"),
    "resize-nearest-down": resize((1, 1, 6, 6), [1, 1, 0.5, 0.5], mode="nearest"),
    "resize-linear-half-pixel": resize((1, 2, 3, 4), [1, 1, 2, 2], mode="linear"),
    "resize-linear-align-sizes": resize((1, 1, 4, 3), sizes=[1, 1, 7, 5], mode="linear",
                                        coordinate_transformation_mode="align_corners"),
    "resize-linear-pytorch-down": resize((1, 1, 6, 8), [1, 1, 0.5, 0.75], mode="linear",
                                         coordinate_transformation_mode="pytorch_half_pixel"),
    "pad-constant": pad_case([0, 0, 1, 2, 0, 1, 0, 1]),
    "pad-constant-negative": pad_case([0, 0, -1, 2, 0, 0, 1, -2]),
    "pad-reflect": pad_case([0, 0, 2, 1, 0, 0, 1, 3], mode="reflect"),
    "pad-edge": pad_case([0, 1, 1, 0, 0, 0, 2, 2], mode="edge"),
    "pad-wrap": with_consts("Pad", (1, 2, 4, 5), {"pads": ints(0, 0, 2, 1, 0, 0, 1, 5)}, opset=19, mode="wrap"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_finite_differences(name):
    check(CASES[name])


def test_every_rule_has_a_case():
    covered = {case.op for case in CASES.values()}
    assert set(BACKWARD) - covered == set()


# ------------------------------------------------------------------ graphs of several nodes
def graph_model(nodes, inputs: dict[str, np.ndarray], outputs: list[str], inits: dict | None = None,
                opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, _elem(a), a.shape) for n, a in inputs.items()],
        [helper.make_tensor_value_info(o, 0, None) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def test_tensor_read_by_several_nodes_sums_their_contributions():
    x = rand(2, 3)
    nodes = [helper.make_node("Tanh", ["x"], ["a"]), helper.make_node("Mul", ["a", "a"], ["sq"]),
             helper.make_node("Sigmoid", ["a"], ["s"]), helper.make_node("Add", ["sq", "s"], ["y"]),
             helper.make_node("Softmax", ["a"], ["z"], axis=0)]
    check_model(graph_model(nodes, {"x": x}, ["y", "z"]), {"x": x}, ["x"], "fan-out")


def test_split_output_without_gradient_and_tensor_off_the_path():
    x, other = rand(2, 5), rand(2, 5)
    nodes = [helper.make_node("Split", ["x", "sizes"], ["p", "q"], axis=1),
             helper.make_node("Relu", ["p"], ["y"]), helper.make_node("Relu", ["q"], ["unused"]),
             helper.make_node("Neg", ["other"], ["off"])]
    model = graph_model(nodes, {"x": x, "other": other}, ["y", "off"], {"sizes": ints(2, 3)})
    got = gradients(model, {"x": x, "other": other}, ["x", "other"], output="y")
    assert np.array_equal(got["x"][:, :2], (x[:, :2] > 0).astype(F64))
    assert np.array_equal(got["x"][:, 2:], np.zeros((2, 3)))
    assert np.array_equal(got["other"], np.zeros((2, 5)))


def test_gradient_of_an_intermediate_activation():
    """d loss / d a for an activation a equals finite differences on the graph cut at a."""
    a, w = rand(3, 4), rand(4, 2)
    nodes = [helper.make_node("Sigmoid", ["x"], ["a"]), helper.make_node("MatMul", ["a", "w"], ["h"]),
             helper.make_node("Tanh", ["h"], ["y"])]
    full = graph_model(nodes, {"x": rand(3, 4)}, ["y"], {"w": w})
    weighted, _ = weigh(full)
    x = rand(3, 4)
    got = gradients(weighted, {"x": x}, ["a", "x"])
    cut = onnx.ModelProto()
    cut.CopyFrom(weighted)
    del cut.graph.node[0]
    cut.graph.input[0].name = "a"
    a = 1 / (1 + np.exp(-x))
    want = finite_differences(cut, {"a": a}, "a", 1e-6)
    assert relative_error(got["a"], want) < 1e-6
    assert relative_error(got["x"], want * a * (1 - a)) < 1e-6


# ------------------------------------------------------------------ a small CNN end to end
def small_cnn(dynamic_batch: bool = False) -> tuple[onnx.ModelProto, dict[str, str]]:
    g = GraphBuilder("x", [4, 3, 8, 8], seed=3, dynamic_batch=dynamic_batch)
    conv = g.conv("x", 6, k=3)
    act = g.relu(g.bn(conv))
    logits = g.gemm(g.flatten(g.maxpool(act)), 5)
    g.output(logits)
    model = g.build()
    node = {n.op_type: n for n in model.graph.node}
    names = {"conv_w": node["Conv"].input[1], "conv_b": node["Conv"].input[2],
             "bn_scale": node["BatchNormalization"].input[1], "fc_w": node["Gemm"].input[1], "act": act}
    return model, names


def as_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy whose initializers ``names`` are graph inputs (to perturb them for finite differences)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [t for t in out.graph.initializer if t.name not in names]
    for t in out.graph.initializer:
        if t.name in names:
            out.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits.astype(F64)
    logp = z - z.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def test_small_cnn_cross_entropy_matches_finite_differences():
    model, names = small_cnn(dynamic_batch=True)
    weights = [names[k] for k in ("conv_w", "conv_b", "bn_scale", "fc_w")]
    gm = build_gradient_model(model, weights + [names["act"]], loss="cross_entropy")
    onnx.checker.check_model(gm.proto, full_check=True)
    assert list(gm.extra_inputs) == ["labels"] and "int64" in gm.extra_inputs["labels"]
    sess = runtime.session(gm.proto)
    forward = runtime.session(as_inputs(model, weights))
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in weights}
    rng = np.random.default_rng(7)
    for batch in (4, 3):  # one graph serves any batch size
        x = rng.standard_normal((batch, 3, 8, 8)).astype(F32)
        labels = rng.integers(0, 5, batch).astype(np.int64)
        got = runtime.run(sess, {"x": x, "labels": labels})
        logits = forward.run(None, {"x": x, **values})[0]
        assert abs(float(got[gm.loss_name]) - cross_entropy(logits, labels)) < 1e-5
        def fd(name: str, idx: tuple, eps: float) -> float:
            losses = []
            for step in (eps, -eps):
                w = values[name].copy()
                w[idx] += step
                losses.append(cross_entropy(forward.run(None, {"x": x, **values, name: w})[0], labels))
            return (losses[0] - losses[1]) / (2 * eps)

        for name in weights:
            grad = got[gm.grad_names[name]]
            checked = 0
            for idx in [tuple(rng.integers(0, d) for d in grad.shape) for _ in range(6)]:
                coarse, fine = fd(name, idx, 3e-3), fd(name, idx, 1e-3)
                if abs(coarse - fine) > 2e-4 * max(1.0, abs(fine)):
                    continue  # a ReLU or max-pool switch lies within the step: no derivative to compare
                assert abs(grad[idx] - fine) < 3e-4 * max(1.0, abs(fine)), (name, idx, grad[idx], fine)
                checked += 1
            assert checked >= 3, f"{name}: too few smooth entries to check"
        act_grad = got[gm.grad_names[names["act"]]]
        assert act_grad.shape == (batch, 6, 8, 8) and np.abs(act_grad).max() > 0


def test_only_nodes_on_the_path_get_backward_nodes():
    model, names = small_cnn()
    gm = build_gradient_model(model, [names["fc_w"]], loss="sum")
    ops = [n.op_type for n in gm.proto.graph.node[len(model.graph.node):]]
    assert "Gemm" in ops and not {"ConvTranspose", "Conv", "MaxPool", "ScatterElements"} & set(ops)


def test_trainable_weights_become_inputs():
    model, names = small_cnn()
    weights = [names["conv_w"], names["fc_w"]]
    gm = build_gradient_model(model, weights, loss="mse", trainable_as_inputs=True)
    assert gm.param_inputs == weights and list(gm.extra_inputs) == ["teacher"]
    inputs = {i.name for i in gm.proto.graph.input}
    assert set(weights) <= inputs and not set(weights) & {t.name for t in gm.proto.graph.initializer}
    sess = runtime.session(gm.proto)
    forward = runtime.session(as_inputs(model, weights))
    x, teacher = rand(4, 3, 8, 8, dtype=F32), rand(4, 5, dtype=F32)
    updated = {k: v - 0.1 * np.sign(v) for k, v in gm.param_values.items()}
    for params in (gm.param_values, updated):
        loss = sess.run([gm.loss_name], {"x": x, "teacher": teacher, **params})[0]
        out = forward.run(None, {"x": x, **params})[0]
        assert abs(float(loss) - float(np.mean((out.astype(F64) - teacher) ** 2))) < 1e-5


# ------------------------------------------------------------------ losses
def mlp() -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=1), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "w2"], ["logits"])]
    inits = {"w1": rand(6, 4), "b1": rand(6), "w2": rand(6, 3)}
    return graph_model(nodes, {"x": rand(5, 4)}, ["logits"], inits)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def kl_divergence(student: np.ndarray, teacher: np.ndarray, t: float) -> float:
    p, q = softmax(teacher / t), softmax(student / t)
    return float((p * (np.log(p) - np.log(q))).sum() / len(p) * t * t)


LOSS_REFERENCES = {
    "cross_entropy": lambda z, extra: cross_entropy(z, extra),
    "kl": lambda z, extra: kl_divergence(z, extra, 2.5),
    "mse": lambda z, extra: float(np.mean((z - extra) ** 2)),
    "sum": lambda z, extra: float(z.sum()),
}


@pytest.mark.parametrize("loss", list(LOSS_REFERENCES))
def test_loss_value_and_gradient(loss):
    model = mlp()
    x = rand(5, 4)
    extra = {"cross_entropy": ints(0, 2, 1, 1, 0), "kl": rand(5, 3), "mse": rand(5, 3), "sum": None}[loss]
    gm = build_gradient_model(model, ["w1", "w2"], loss=loss, temperature=2.5)
    feeds = {"x": x, **{name: extra for name in gm.extra_inputs}}
    got = runtime.run(runtime.session(gm.proto), feeds)
    forward = runtime.session(as_inputs(model, ["w1", "w2"]))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}

    def reference(ws: dict) -> float:
        return LOSS_REFERENCES[loss](forward.run(None, {"x": x, "w1": ws["w1"], "w2": ws["w2"]})[0], extra)

    assert abs(float(got[gm.loss_name]) - reference(weights)) < 1e-10
    for name in ("w1", "w2"):
        fd = np.zeros_like(weights[name])
        for idx in np.ndindex(*fd.shape):
            plus, minus = weights[name].copy(), weights[name].copy()
            plus[idx] += 1e-6
            minus[idx] -= 1e-6
            fd[idx] = (reference({**weights, name: plus}) - reference({**weights, name: minus})) / 2e-6
        assert relative_error(got[gm.grad_names[name]], fd) < 1e-6


# ------------------------------------------------------------------ opsets and errors
def test_old_opset_is_upgraded_and_overlapping_maxpool_gets_opset_16():
    g = GraphBuilder("x", [2, 3, 6, 6], opset=11, seed=5)
    g.output(g.gemm(g.flatten(g.relu(g.conv("x", 4, k=3))), 3))
    model = g.build()
    weight = model.graph.node[0].input[1]
    gm = build_gradient_model(model, [weight], loss="sum")
    assert gm.opset == 13
    onnx.checker.check_model(gm.proto, full_check=True)
    assert runtime.run(runtime.session(gm.proto), {"x": rand(2, 3, 6, 6, dtype=F32)})[gm.grad_names[weight]].shape \
        == (4, 3, 3, 3)
    pool = op_model(CASES["maxpool-opset13-overlap"])
    assert build_gradient_model(pool, ["x"], loss="sum").opset == 16
    assert build_gradient_model(op_model(pool_case_opset13_no_overlap()), ["x"], loss="sum").opset == 13


def pool_case_opset13_no_overlap() -> Case:
    return pool("MaxPool", (1, 1, 5, 5), dtype=F64, kernel_shape=[2, 2], strides=[2, 2], opset=13)


def test_maxpool_without_overlap_at_opset_13():
    check(pool_case_opset13_no_overlap())


def test_op_without_rule_is_named():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Cos", ["a"], ["b"], name="the_cos"),
             helper.make_node("Tanh", ["b"], ["y"]), helper.make_node("Sin", ["x"], ["aside"])]
    model = graph_model(nodes, {"x": rand(2, 3)}, ["y", "aside"])
    with pytest.raises(OnnxPruneError, match=r"no gradient rule for Cos \(node the_cos\)"):
        build_gradient_model(model, ["x"], loss="sum", output="y")
    # past the op without a rule, gradients are fine; ops off the path need no rule either
    assert set(build_gradient_model(model, ["b"], loss="sum", output="y").grad_names) == {"b"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(wrt=["nope"], loss="sum"), "'nope' is not in the model"),
    (dict(wrt=["w1"], loss="hinge"), "unknown loss 'hinge'"),
    (dict(wrt=[], loss="sum"), "no tensors to differentiate"),
    (dict(wrt=["w1"], loss="cross_entropy", output="h3"), "needs \\[N, C\\] logits"),
    (dict(wrt=["shape"], loss="sum"), "not floating point"),
])
def test_bad_requests_raise_clear_errors(kwargs, message):
    model = mlp()
    model.graph.node.append(helper.make_node("Unsqueeze", ["logits", "shape"], ["h3"]))
    model.graph.initializer.append(numpy_helper.from_array(ints(0), "shape"))
    model.graph.output.append(helper.make_tensor_value_info("h3", TensorProto.DOUBLE, None))
    with pytest.raises(OnnxPruneError, match=message):
        build_gradient_model(model, **kwargs)


def test_shapes_that_inference_misses_are_measured():
    """A Reshape target built from int32 Casts and Constant nodes (as paddle2onnx writes it) defeats ONNX shape
    inference; one runtime pass over the static-shaped inputs fills in what the rules need."""
    x, bias, teacher = rand(2, 3, 4), rand(12), rand(2, 12)

    def constant(name, value):
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))

    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["s32"], to=TensorProto.INT32),
             constant("zero", ints(0)), constant("one", ints(1)), constant("width", np.array([12], np.int32)),
             helper.make_node("Slice", ["s32", "zero", "one"], ["n"]),
             helper.make_node("Cast", ["n"], ["n64"], to=TensorProto.INT64),
             helper.make_node("Cast", ["width"], ["w64"], to=TensorProto.INT64),
             helper.make_node("Concat", ["n64", "w64"], ["target"], axis=-1),
             helper.make_node("Reshape", ["x", "target"], ["flat"]), helper.make_node("Add", ["flat", "bias"], ["y"])]
    model = graph_model(nodes, {"x": x}, ["y"], {"bias": bias}, opset=11)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 12]))
    assert ir.infer_shapes(model).get("flat") is None
    got = gradients(model, {"x": x, "teacher": teacher}, ["x", "bias"], loss="mse", output="y")
    residual = 2 * (x.reshape(2, 12) + bias - teacher) / 24
    assert relative_error(got["x"], residual.reshape(2, 3, 4)) < 1e-12
    assert relative_error(got["bias"], residual.sum(0)) < 1e-12
