"""A tiny builder for real ONNX graphs (random weights, fixed seed), for tests and the fuzzer.

    g = GraphBuilder("x", [1, 3, 16, 16])
    y = g.conv("x", 8, k=3, pad=1)
    y = g.relu(y)
    g.output(g.gemm(g.flatten(g.gap(y)), 10))
    model = g.build()           # onnx.ModelProto, checked
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class GraphBuilder:
    def __init__(self, input_name: str = "x", shape=(1, 3, 16, 16), *, opset: int = 17, seed: int = 0,
                 dynamic_batch: bool = False):
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs = []
        self.outputs = []
        self.shapes: dict[str, list[int]] = {}
        self._n = 0
        if input_name:
            self.input(input_name, shape, dynamic_batch=dynamic_batch)

    # -------------------------------------------------- plumbing
    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def input(self, name, shape, dtype=TensorProto.FLOAT, dynamic_batch=False):
        dims = ["N" if (dynamic_batch and i == 0) else d for i, d in enumerate(shape)]
        self.inputs.append(helper.make_tensor_value_info(name, dtype, dims))
        self.shapes[name] = list(shape)
        return name

    def const(self, value, prefix="c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, shape, prefix="w", scale=None) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), prefix)

    def op(self, op_type, inputs, n_out=1, prefix=None, **attrs):
        prefix = prefix or op_type.lower()
        outs = [self.name(prefix) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def output(self, name, dtype=TensorProto.FLOAT):
        self.outputs.append(helper.make_tensor_value_info(name, dtype, None))
        return name

    def build(self, check=True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "test", self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        model = onnx.shape_inference.infer_shapes(model)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model

    def channels(self, x) -> int:
        # (shapes of tensors shape inference cannot see through can be set in self.shapes)
        """Channel count (axis 1) of a tensor, by running shape inference on what is built so far."""
        return self.shape(x)[1]

    def shape(self, x) -> list[int]:
        if x in self.shapes:
            return self.shapes[x]
        for init in self.inits:
            if init.name == x:
                return list(init.dims)
        graph = helper.make_graph(self.nodes, "tmp", self.inputs, [helper.make_tensor_value_info(x, 1, None)],
                                  self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        m = onnx.shape_inference.infer_shapes(m)
        for vi in list(m.graph.value_info) + list(m.graph.output):
            if vi.name == x and vi.type.tensor_type.HasField("shape"):
                return [d.dim_value for d in vi.type.tensor_type.shape.dim]
        raise KeyError(x)

    # -------------------------------------------------- layers
    def conv(self, x, cout, k=3, stride=1, pad=None, group=1, dilation=1, bias=True):
        cin = self.channels(x)
        pad = (k // 2) * dilation if pad is None else pad
        w = self.weight([cout, cin // group, k, k])
        ins = [x, w] + ([self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")] if bias else [])
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                       group=group, dilations=[dilation, dilation])

    def conv_transpose(self, x, cout, k=2, stride=2, group=1, bias=True):
        cin = self.channels(x)
        w = self.weight([cin, cout // group, k, k])
        ins = [x, w] + ([self.const((self.rng.standard_normal(cout) * 0.1).astype(np.float32), "b")] if bias else [])
        return self.op("ConvTranspose", ins, kernel_shape=[k, k], strides=[stride, stride], group=group)

    def bn(self, x):
        c = self.channels(x)
        r = self.rng
        return self.op("BatchNormalization", [
            x,
            self.const((r.uniform(0.5, 1.5, c)).astype(np.float32), "scale"),
            self.const((r.standard_normal(c) * 0.1).astype(np.float32), "beta"),
            self.const((r.standard_normal(c) * 0.1).astype(np.float32), "mean"),
            self.const((r.uniform(0.5, 1.5, c)).astype(np.float32), "var"),
        ], epsilon=1e-5)

    def relu(self, x):
        return self.op("Relu", [x])

    def gap(self, x):
        return self.op("GlobalAveragePool", [x])

    def flatten(self, x, axis=1):
        return self.op("Flatten", [x], axis=axis)

    def gemm(self, x, nout, trans_b=1, bias=True):
        nin = self.shape(x)[-1]
        w = self.weight([nout, nin] if trans_b else [nin, nout])
        ins = [x, w] + ([self.const((self.rng.standard_normal(nout) * 0.1).astype(np.float32), "b")] if bias else [])
        return self.op("Gemm", ins, transB=trans_b)

    def matmul(self, x, nout, bias=True):
        nin = self.shape(x)[-1]
        y = self.op("MatMul", [x, self.weight([nin, nout])])
        if bias:
            y = self.op("Add", [y, self.const((self.rng.standard_normal(nout) * 0.1).astype(np.float32), "b")])
        return y

    def add(self, a, b):
        return self.op("Add", [a, b])

    def mul(self, a, b):
        return self.op("Mul", [a, b])

    def concat(self, xs, axis=1):
        return self.op("Concat", xs, axis=axis)

    def reshape(self, x, shape):
        return self.op("Reshape", [x, self.const(np.array(shape, dtype=np.int64), "shape")])

    def transpose(self, x, perm):
        return self.op("Transpose", [x], perm=list(perm))

    def maxpool(self, x, k=2, stride=2):
        return self.op("MaxPool", [x], kernel_shape=[k, k], strides=[stride, stride])

    def avgpool(self, x, k=2, stride=2):
        return self.op("AveragePool", [x], kernel_shape=[k, k], strides=[stride, stride])
