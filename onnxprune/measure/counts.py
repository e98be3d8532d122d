"""Parameter and MAC counts of an ONNX model, per layer and in total.

``summarize(proto)`` gives a :class:`ModelStats`. Counting rules:

* ``params``: elements of every floating-point constant tensor of rank >= 1,
  initializers and ``Constant`` nodes alike (subgraphs included), each distinct
  tensor once however many nodes share it. BatchNormalization running mean and
  variance are constants, so they count (PyTorch calls them buffers, not
  parameters). Integer tensors (shapes, indices, quantized weights) and scalars
  do not count.
* Layers are the nodes of the main graph with a rule in ``LAYER_COSTS`` (Conv,
  ConvTranspose, Gemm, MatMul). One whose weight operand is a constant (an
  initializer or ``Constant`` node, possibly through Identity/Cast) is a
  *weight layer*; its ``params`` are the weight's elements plus its bias (the
  bias input of Conv/ConvTranspose/Gemm, or for MatMul a constant ``Add``
  that is its only consumer). A MatMul between two activations (attention
  Q·Kᵀ, A·V) is listed too, with ``weight == ""`` and ``params == 0``, so
  that the layers' MACs always add up to the model's ``macs``;
  :attr:`ModelStats.weight_layers` leaves them out.
* MACs are exact multiply-accumulates from concrete shapes: bias adds,
  activations, norms and pooling are not counted.

Shapes come from ONNX shape inference on the model with concrete input shapes;
when a shape a layer needs is still unknown (a dynamic Reshape chain, say),
one onnxruntime run on zeros fills it in.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx

from .. import ir
from ..errors import OnnxPruneError

Shape = list[int]
FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16,
})
PASS_THROUGH = ("Identity", "Cast")  # ops a weight may travel through on its way to a layer


@dataclass
class LayerStats:
    """One Conv / ConvTranspose / Gemm / MatMul node."""

    name: str
    op: str
    weight: str  # name of the constant weight tensor; "" for a product of two activations
    weight_shape: list[int]
    params: int  # weight + bias elements
    macs: int
    output_shape: list[int]


@dataclass
class ModelStats:
    params: int
    macs: int
    layers: list[LayerStats] = field(default_factory=list)
    file_bytes: int | None = None

    @property
    def weight_layers(self) -> list[LayerStats]:
        """Layers that carry a constant weight (activation MatMuls left out)."""
        return [layer for layer in self.layers if layer.weight]

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "file_bytes": self.file_bytes,
                "layers": [asdict(layer) for layer in self.layers]}


# ---------------------------------------------------------------- per-op rules

@dataclass(frozen=True)
class LayerCost:
    """How to read one op: which operands hold weight and bias, and its MACs from shapes."""

    weight_slots: tuple[int, ...]  # inputs that may be the constant weight, preferred first
    bias_slot: int | None  # input holding the bias, if the op has one
    needs: tuple[str, ...]  # shapes the MAC formula reads ("in0", "in1"), always with "out0"
    macs: Callable[[onnx.NodeProto, dict[str, Shape]], int]


def _conv(node, s):  # N·Cout·prod(out_spatial) · (Cin/group)·prod(kernel)
    return math.prod(s["out0"]) * math.prod(s["in1"][1:])


def _conv_transpose(node, s):  # N·Cin·prod(in_spatial) · (Cout/group)·prod(kernel)
    return math.prod(s["in0"]) * math.prod(s["in1"][1:])


def _gemm(node, s):  # M·N · K, K read from B (shape (K, N), or (N, K) when transB)
    trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
    b = s["in1"]
    return math.prod(s["out0"]) * (b[1] if trans_b else b[0])


def _matmul(node, s):  # prod(output) · K, K read from B (shape (..., K, N), or (K,))
    b = s["in1"]
    return math.prod(s["out0"]) * (b[0] if len(b) == 1 else b[-2])


LAYER_COSTS: dict[str, LayerCost] = {
    "Conv": LayerCost((1,), 2, ("in1", "out0"), _conv),
    "ConvTranspose": LayerCost((1,), 2, ("in0", "in1", "out0"), _conv_transpose),
    "Gemm": LayerCost((1, 0), 2, ("in1", "out0"), _gemm),
    "MatMul": LayerCost((1, 0), None, ("in1", "out0"), _matmul),
}


def _slot_name(node: onnx.NodeProto, slot: str) -> str:
    seq = node.input if slot.startswith("in") else node.output
    i = int(slot[-1])
    return seq[i] if i < len(seq) else ""


# ---------------------------------------------------------------- constants

@dataclass(frozen=True)
class Const:
    shape: tuple[int, ...]
    floating: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def constants(graph: onnx.GraphProto) -> dict[str, Const]:
    """Every constant tensor of ``graph`` and its subgraphs: initializers and ``Constant`` outputs."""
    found = {t.name: Const(tuple(t.dims), t.data_type in FLOAT_TYPES) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            t = ir.constant_tensor(node)
            if t is not None:
                found[node.output[0]] = Const(tuple(t.dims), t.data_type in FLOAT_TYPES)
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                found.update(constants(sub))
    return found


def count_params(consts: dict[str, Const]) -> int:
    return sum(c.size for c in consts.values() if c.floating and len(c.shape) >= 1)


# ---------------------------------------------------------------- shapes

def _needed(node: onnx.NodeProto) -> list[str]:
    return [n for n in (_slot_name(node, s) for s in LAYER_COSTS[node.op_type].needs) if n]


def concrete_shapes(proto: onnx.ModelProto, names: set[str], known: dict[str, Shape],
                    full: Callable[[], onnx.ModelProto] | None = None
                    ) -> dict[str, Shape]:
    """Shapes of ``names``: ONNX shape inference first, one onnxruntime run on zeros for the rest.

    ``proto`` may be a weight-free skeleton; ``full()`` then gives the runnable model for the fallback.
    """
    shapes = dict(known)
    for name, dims in ir.infer_shapes(proto).items():
        if name not in shapes and all(isinstance(d, int) and d > 0 for d in dims):
            shapes[name] = list(dims)
    missing = sorted(n for n in names if n not in shapes)
    if missing:
        shapes.update(_shapes_by_running(full() if full else proto, missing))
    return shapes


def _shapes_by_running(proto: onnx.ModelProto, names: list[str]) -> dict[str, Shape]:
    from .. import runtime  # onnxruntime is only needed when shape inference falls short

    sess = runtime.session(runtime.with_outputs(proto, names), optimize=False)
    feed = {i.name: (np.ones if ir.is_mask_input(i) else np.zeros)(
                [d if isinstance(d, int) and d >= 0 else 1 for d in ir.input_dims(i)],  # 0: an empty cache
                dtype=ir.input_dtype(i))
            for i in ir.graph_inputs(proto)}
    try:
        values = sess.run(names, feed)  # runners run quietly: the failure becomes our one-line error
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        given = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in feed.items())
        raise OnnxPruneError(f"cannot work out tensor shapes: onnxruntime failed on zero inputs {given} ({first}); "
                             "pass --input-shape NAME=... with the sizes the model expects") from None
    return {n: list(np.shape(v)) for n, v in zip(names, values)}


# ---------------------------------------------------------------- summary

def summarize(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> ModelStats:
    """Params and MACs of ``proto``; ``input_shapes`` fixes symbolic input dims (others become 1)."""
    shapes_in = ir.resolve_input_shapes(proto, input_shapes)
    skeleton = _forget_shapes(ir.skeleton(proto, shapes_in))  # weight-free: inference stays cheap
    graph = proto.graph
    consts = constants(graph)
    layer_nodes = [n for n in graph.node if n.op_type in LAYER_COSTS]
    need = {name for n in layer_nodes for name in _needed(n)}
    shapes = concrete_shapes(skeleton, need, {k: list(c.shape) for k, c in consts.items()},
                             full=lambda: _forget_shapes(ir.with_input_shapes(proto, shapes_in)))
    source = _constant_sources(graph, consts)
    consumers = _consumers(graph)
    layers = [_layer(n, shapes, source, consts, consumers) for n in layer_nodes]
    return ModelStats(params=count_params(consts), macs=sum(layer.macs for layer in layers), layers=layers)


def _forget_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop recorded intermediate and output shapes: they describe the exporter's input sizes, not ours."""
    del model.graph.value_info[:]
    for vi in model.graph.output:
        vi.type.tensor_type.ClearField("shape")
    return model


def _constant_sources(graph: onnx.GraphProto, consts: dict[str, Const]) -> dict[str, str]:
    """Tensor name -> the constant it is a copy of (itself for constants, through Identity/Cast)."""
    source = {name: name for name in consts}
    for node in graph.node:  # nodes are topologically sorted in a valid model
        if node.op_type in PASS_THROUGH and node.input and node.input[0] in source:
            source[node.output[0]] = source[node.input[0]]
    return source


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input):
            users.setdefault(name, []).append(node)
    return users


def _layer(node: onnx.NodeProto, shapes: dict[str, Shape], source: dict[str, str],
           consts: dict[str, Const], consumers: dict[str, list[onnx.NodeProto]]) -> LayerStats:
    rule = LAYER_COSTS[node.op_type]
    s = {slot: shapes[_slot_name(node, slot)] for slot in rule.needs}
    weight = next((source[node.input[i]] for i in rule.weight_slots
                   if i < len(node.input) and node.input[i] in source), "")
    params = 0
    if weight:
        bias = _bias(node, rule, source, consumers)
        params = consts[weight].size + (consts[bias].size if bias else 0)
    return LayerStats(
        name=node.name or node.output[0], op=node.op_type, weight=weight,
        weight_shape=list(consts[weight].shape) if weight else [], params=params,
        macs=int(rule.macs(node, s)), output_shape=list(s["out0"]))


def _bias(node: onnx.NodeProto, rule: LayerCost, source: dict[str, str],
          consumers: dict[str, list[onnx.NodeProto]]) -> str:
    if rule.bias_slot is not None:
        i = rule.bias_slot
        return source.get(node.input[i], "") if i < len(node.input) and node.input[i] else ""
    users = consumers.get(node.output[0], [])  # MatMul: a constant Add that is its only consumer
    if len(users) == 1 and users[0].op_type == "Add":
        other = [n for n in users[0].input if n != node.output[0]]
        if len(other) == 1 and other[0] in source:
            return source[other[0]]
    return ""


# ---------------------------------------------------------------- the inspect report

def _tensor(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type.tensor_type
    dtype = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "unknown"
    return {"name": vi.name, "dtype": dtype, "shape": ir.input_dims(vi)}


def describe(model: ir.Model, shapes: dict[str, list[int]]) -> dict:
    """The ``inspect`` report, JSON-ready: the file, its inputs and outputs (declared and analysed
    shapes), and :func:`summarize`'s params, MACs and layers at ``shapes`` (concrete input shapes)."""
    proto = model.proto
    stats = summarize(proto, shapes)
    inputs = [dict(_tensor(vi), analysed_shape=shapes[vi.name]) for vi in ir.graph_inputs(proto)]
    producer = " ".join(x for x in (proto.producer_name, proto.producer_version) if x)
    return {"file": str(model.path), "file_bytes": model.file_bytes, "opset": model.opset,
            "ir_version": proto.ir_version, "producer": producer,
            "inputs": inputs, "outputs": [_tensor(vi) for vi in proto.graph.output],
            **{k: v for k, v in stats.to_dict().items() if k != "file_bytes"}}
