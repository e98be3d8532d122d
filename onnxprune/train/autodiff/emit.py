"""The node emitter and the per-node context that gradient rules receive.

``Emitter`` appends backward nodes and constants to a growing list with fresh
names, in the model's float type and opset (13 or later, so ReduceSum, Split,
Squeeze and Unsqueeze take their axes as inputs). Its helpers are the small
compositions every rule needs: sums over axes, undoing a broadcast, zeros,
and contracting one axis with a constant matrix.

``RuleContext`` is what a rule sees of its forward node: attributes with
defaults, input and output names, static shapes from shape inference and the
values of constant inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import OnnxPruneError

Shape = list  # list[int | None]: a static shape, None where shape inference left a dim unknown


class Emitter:
    """Appends backward nodes; every name it makes is fresh in the model."""

    def __init__(self, elem_type: int, opset: int, taken: set[str], prefix: str = "grad"):
        self.elem_type = elem_type
        self.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._taken = taken
        self._prefix = prefix
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self._n += 1
            name = f"{self._prefix}/{hint}_{self._n}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, **attrs) -> str | list[str]:
        """Append one node; returns its output name (a list when ``n_out`` > 1)."""
        outs = [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    # -------------------------------------------------- constants
    def const(self, value, dtype=None) -> str:
        """A constant initializer (float type of the model unless ``dtype`` says otherwise), shared by value."""
        arr = np.asarray(value, dtype=dtype or self.dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.inits.append(numpy_helper.from_array(arr, name))
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values) -> str:
        return self.const(np.asarray(values, dtype=np.int64).reshape(-1), np.int64)

    def scalar_tensor(self, value: float) -> onnx.TensorProto:
        """A one-element tensor attribute value, e.g. for ConstantOfShape."""
        return numpy_helper.from_array(np.array([value], dtype=self.dtype))

    # -------------------------------------------------- shape helpers
    def shape_of(self, x: str) -> str:
        return self.op("Shape", [x])

    def reshape(self, x: str, shape: Sequence[int | None] | str) -> str:
        """Reshape to a static shape (one unknown dim allowed, as -1) or to a runtime shape tensor."""
        if isinstance(shape, str):
            return self.op("Reshape", [x, shape])
        dims = [-1 if d is None else int(d) for d in shape]
        if dims.count(-1) > 1:
            raise OnnxPruneError(f"cannot reshape a gradient to {list(shape)}: more than one unknown dimension")
        return self.op("Reshape", [x, self.ints(dims)])

    def reshape_like(self, x: str, like: str) -> str:
        return self.op("Reshape", [x, self.shape_of(like)])

    def zeros_like(self, x: str) -> str:
        return self.op("ConstantOfShape", [self.shape_of(x)], value=self.scalar_tensor(0.0))

    def ones_like(self, x: str) -> str:
        return self.op("ConstantOfShape", [self.shape_of(x)], value=self.scalar_tensor(1.0))

    def reduce_sum(self, x: str, axes: Sequence[int] | None, keepdims: bool = True) -> str:
        """Sum over ``axes`` (all axes when None); an empty list is a no-op."""
        if axes is not None and len(axes) == 0:
            return x
        ins = [x] if axes is None else [x, self.ints(sorted(axes))]
        return self.op("ReduceSum", ins, keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)]) if len(axes) else x

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.ints(axes)]) if len(axes) else x

    def split(self, x: str, sizes: Sequence[int], axis: int) -> list[str]:
        outs = self.op("Split", [x, self.ints(sizes)], n_out=len(sizes), axis=axis)
        return outs if isinstance(outs, list) else [outs]

    def transpose(self, x: str, perm: Sequence[int]) -> str:
        perm = list(perm)
        return x if perm == sorted(perm) else self.op("Transpose", [x], perm=perm)

    def mask(self, cond: str, g: str) -> str:
        """``g`` where ``cond`` holds, else 0 (a Mul by the cast mask: onnxruntime's Where is slower)."""
        return self.op("Mul", [g, self.cast_float(cond)])

    def cast_float(self, x: str) -> str:
        return self.op("Cast", [x], to=self.elem_type)

    # -------------------------------------------------- calculus helpers
    def unbroadcast(self, g: str, src_shape: Shape, target: str, target_shape: Shape) -> str:
        """Sum ``g`` (shaped ``src_shape``) back to the shape of ``target``, which was broadcast to make it."""
        k, rank = len(target_shape), len(src_shape)
        lead = list(range(rank - k))
        ones = [rank - k + i for i, d in enumerate(target_shape) if d == 1 and src_shape[rank - k + i] != 1]
        if not lead and not ones:
            return g
        summed = self.reduce_sum(g, lead + ones, keepdims=True)
        if None in target_shape:
            return self.reshape_like(summed, target)
        return self.reshape(summed, target_shape)

    def axis_matmul(self, g: str, axis: int, rank: int, matrix: np.ndarray) -> str:
        """Contract axis ``axis`` of ``g`` (size ``matrix.shape[0]``) with ``matrix``: the result has ``matrix.shape[1]`` there."""
        axis %= rank
        perm = [i for i in range(rank) if i != axis] + [axis]
        moved = self.transpose(g, perm)
        prod = self.op("MatMul", [moved, self.const(matrix)])
        inverse = list(np.argsort(perm))
        return self.transpose(prod, inverse)

    def add_all(self, terms: Sequence[str]) -> str:
        """The sum of same-shaped gradient contributions."""
        return terms[0] if len(terms) == 1 else self.op("Sum", list(terms))


@dataclass
class RuleContext:
    """What a gradient rule knows about its forward node."""

    node: onnx.NodeProto
    emit: Emitter
    shapes: dict[str, Shape]
    values: dict[str, np.ndarray]
    needed: frozenset[int] = field(default_factory=frozenset)

    @property
    def inputs(self) -> list[str]:
        return list(self.node.input)

    @property
    def outputs(self) -> list[str]:
        return list(self.node.output)

    @property
    def opset(self) -> int:
        return self.emit.opset

    def wants(self, i: int) -> bool:
        """Whether the gradient of input ``i`` is needed."""
        return i in self.needed

    def attr(self, name: str, default=None):
        for a in self.node.attribute:
            if a.name == name:
                v = helper.get_attribute_value(a)
                return v.decode() if isinstance(v, bytes) else v
        return default

    def input(self, i: int) -> str:
        """Name of input ``i``, or '' when the optional input is absent."""
        return self.node.input[i] if i < len(self.node.input) else ""

    def shape(self, name: str) -> Shape:
        if name not in self.shapes:
            self.fail(f"shape inference gives no shape for '{name}'; give the model static input shapes")
        return list(self.shapes[name])

    def static_shape(self, name: str) -> list[int]:
        shape = self.shape(name)
        if None in shape:
            self.fail(f"tensor '{name}' has an unknown dimension {shape}; give the model static input shapes")
        return shape

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def value(self, i: int, default=None) -> np.ndarray | None:
        """Value of constant input ``i``; ``default`` when the input is absent; an error when not constant."""
        name = self.input(i)
        if not name:
            return default
        if name not in self.values:
            self.fail(f"input '{name}' must be a constant (an initializer or Constant node) for its gradient")
        return self.values[name]

    def fail(self, why: str):
        raise OnnxPruneError(f"gradient of {self.node.op_type} (node {self.node.name or self.node.output[0]}): {why}")
