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

from onnxprune import runtime
from onnxprune.autodiff import RULES, build_gradient_model
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


def weighted_model(case: Case) -> tuple[onnx.ModelProto, np.dtype]:
    """The op, then each output times a fixed random tensor, summed into the scalar output 'out'."""
    outs = [f"y{i}" for i in range(case.n_out)]
    inputs = [helper.make_tensor_value_info(n, _elem(case.arrays[n]), case.arrays[n].shape) for n in case.wrt]
    inits = [numpy_helper.from_array(a, n) for n, a in case.arrays.items() if n not in case.wrt]
    nodes = [helper.make_node(case.op, case.ins, outs, name="op", **case.attrs)]
    graph = helper.make_graph(nodes, "t", inputs, [helper.make_tensor_value_info(o, 0, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    types = {vi.name: vi.type.tensor_type for vi in inferred.graph.output}
    dtype = helper.tensor_dtype_to_np_dtype(types[outs[0]].elem_type)
    graph = model.graph
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
    return model, np.dtype(dtype)


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


def check(case: Case) -> None:
    model, dtype = weighted_model(case)
    feeds = {n: case.arrays[n] for n in case.wrt}
    got = gradients(model, feeds, case.wrt)
    eps, tol = (1e-6, 1e-6) if dtype == F64 else (1e-2, 3e-4)
    for name in case.wrt:
        want = finite_differences(model, feeds, name, eps)
        assert np.abs(want).max() > 0, f"{name}: finite differences are all zero, the test checks nothing"
        err = relative_error(got[name], want)
        assert err < tol, f"{case.op} d/d{name}: relative error {err:.2e}\ngot\n{got[name]}\nwant\n{want}"


# ------------------------------------------------------------------ per-rule cases
def conv_case(x, w, b=True, **attrs):
    arrays = {"x": rand(*x, dtype=F32), "w": rand(*w, dtype=F32)}
    if b:
        arrays["b"] = rand(w[0], dtype=F32)
    return Case("Conv", list(arrays), arrays, list(arrays), attrs)


def conv_t_case(x, w, group=1, **attrs):
    arrays = {"x": rand(*x, dtype=F32), "w": rand(*w, dtype=F32), "b": rand(w[1] * group, dtype=F32)}
    return Case("ConvTranspose", list(arrays), arrays, list(arrays), dict(group=group, **attrs))


def unary(op, shape=(2, 3, 4), dtype=F64, low=None, high=None, opset=17, **attrs):
    arrays = {"x": rand(*shape, dtype=dtype, low=low, high=high)}
    return Case(op, ["x"], arrays, ["x"], attrs, opset=opset)


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
    "conv-group": conv_case((2, 4, 5, 5), (6, 2, 3, 3), group=2, strides=[2, 1], pads=[1, 1, 1, 1]),
    "conv-depthwise": conv_case((1, 3, 6, 6), (3, 1, 3, 3), group=3, strides=[2, 2], pads=[1, 1, 1, 1]),
    "conv-no-bias-1d": conv_case((2, 2, 9), (3, 2, 4), b=False, strides=[3], pads=[2, 0]),
    "conv-same-upper": conv_case((1, 2, 6, 5), (2, 2, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]),
    "convtranspose": conv_t_case((1, 3, 3, 3), (3, 2, 2, 2), strides=[2, 2]),
    "convtranspose-pad-outpad": conv_t_case((2, 2, 3, 4), (2, 3, 3, 3), strides=[2, 2], pads=[1, 1, 1, 1],
                                            output_padding=[1, 0]),
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
    "hardsigmoid": unary("HardSigmoid", dtype=F32, low=-4, high=4, alpha=0.25, beta=0.4),
    "hardswish": unary("HardSwish", dtype=F32, low=-5, high=5, opset=17),
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
    "globalmaxpool": pool("GlobalMaxPool"),
    "reducemean": unary("ReduceMean", (2, 3, 4), axes=[1, -1], keepdims=0),
    "reducemean-opset18": with_consts("ReduceMean", (2, 3, 4), {"axes": ints(0)}, opset=18),
    "reducesum-all": unary("ReduceSum", (2, 3), keepdims=0),
    "resize-nearest-asymmetric": resize((1, 2, 3, 4), [1, 1, 2, 2], mode="nearest",
                                        coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
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
}


@pytest.mark.parametrize("name", list(CASES))
def test_rule_matches_finite_differences(name):
    check(CASES[name])


def test_every_rule_has_a_case():
    covered = {case.op for case in CASES.values()}
    assert set(RULES) - covered == set()
