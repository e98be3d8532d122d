"""Build one ONNX graph that computes a model's outputs, a scalar loss and reverse-mode gradients.

The forward nodes are kept as they are; the loss and then the backward nodes
are appended. Only nodes on a path from a ``wrt`` tensor to the loss get
backward nodes; a tensor read by several nodes gets the sum of their
contributions. The result runs in onnxruntime like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from ... import ir, runtime
from ...errors import OnnxPruneError
from .emit import Emitter, RuleContext
from .losses import LOSSES, LossInput
from .backward import BACKWARD, NEEDS_OPSET

MIN_OPSET = 13
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
               onnx.TensorProto.BFLOAT16)


@dataclass
class GradientModel:
    """A model whose outputs are the original outputs, the loss, and one gradient per ``wrt`` tensor.

    ``loss_name`` is the scalar loss output; ``grad_names`` maps each ``wrt`` tensor to the output
    holding its gradient (same shape); ``extra_inputs`` names the inputs the loss adds (``labels``,
    ``teacher``) with a description of each; ``param_inputs`` are the initializers that became graph
    inputs (``trainable_as_inputs``), whose current values are in ``param_values``; ``output`` is the
    tensor the loss is computed on and ``opset`` the opset of ``proto``.
    """

    proto: onnx.ModelProto
    loss_name: str
    grad_names: dict[str, str]
    extra_inputs: dict[str, str]
    param_inputs: list[str] = field(default_factory=list)
    param_values: dict[str, np.ndarray] = field(default_factory=dict)
    output: str = ""
    opset: int = 0


@dataclass
class _Plan:
    """Tensors that depend on a ``wrt`` tensor and reach the loss output, and the nodes producing them."""

    relevant: set[str]
    nodes: list[onnx.NodeProto]
    types: dict[str, int]  # element type of every tensor shape inference could type


def build_gradient_model(proto: onnx.ModelProto, wrt: list[str], loss: str = "cross_entropy",
                         output: str | None = None, *, trainable_as_inputs: bool = False,
                         temperature: float = 1.0) -> GradientModel:
    """A graph computing ``loss`` on ``output`` (default: the first graph output) and its gradients.

    ``wrt`` names initializers, graph inputs or intermediate tensors. With
    ``trainable_as_inputs`` the initializers among them become graph inputs (their
    current values are in ``param_values``) so updated weights can be fed without
    rebuilding. ``temperature`` is the softmax temperature of the ``kl`` loss.
    """
    if loss not in LOSSES:
        raise OnnxPruneError(f"unknown loss '{loss}'; choose one of: {', '.join(LOSSES)}")
    if not wrt:
        raise OnnxPruneError("no tensors to differentiate: pass at least one name in wrt")
    model = _upgraded(proto, MIN_OPSET)
    output = output or model.graph.output[0].name
    plan = _plan(model, wrt, output)
    needed = max([MIN_OPSET] + [NEEDS_OPSET[n.op_type](n) for n in plan.nodes if n.op_type in NEEDS_OPSET])
    if needed > _opset(model):
        model = _upgraded(model, needed)
        plan = _plan(model, wrt, output)
    return _assemble(model, list(dict.fromkeys(wrt)), loss, output, plan, trainable_as_inputs, temperature)


# ------------------------------------------------------------------ preparation
def _opset(model: onnx.ModelProto) -> int:
    return ir.Model(model).opset


def _upgraded(proto: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """A copy of ``proto`` at ``opset`` or later (onnx.version_converter when it is older)."""
    have = _opset(proto)
    if have == 0:
        raise OnnxPruneError("model imports no default-domain opset; it is not a standard ONNX model")
    if have >= opset:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        return model
    try:
        return version_converter.convert_version(proto, opset)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxPruneError(f"gradients need opset {opset}, and converting this opset-{have} model failed "
                             f"({first}); re-export it at opset {opset} or later") from None


def _float_tensors(model: onnx.ModelProto) -> tuple[set[str], dict[str, int]]:
    """Names of floating-point tensors (unknown types count as float) and every known element type."""
    types = {n: t.tensor_type.elem_type for n, t in runtime.tensor_types(model).items()}
    names = {t for n in model.graph.node for t in n.output} | set(types)
    return {t for t in names if types.get(t, onnx.TensorProto.FLOAT) in FLOAT_TYPES}, types


def _check_names(model: onnx.ModelProto, wrt: list[str], output: str) -> None:
    g = model.graph
    known = {t for n in g.node for t in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    missing = [t for t in wrt + [output] if t not in known]
    if missing:
        raise OnnxPruneError(f"tensor '{missing[0]}' is not in the model; name an initializer, input or node output")


def _plan(model: onnx.ModelProto, wrt: list[str], output: str) -> _Plan:
    _check_names(model, wrt, output)
    floats, types = _float_tensors(model)
    bad = [t for t in wrt if t not in floats]
    if bad:
        raise OnnxPruneError(f"tensor '{bad[0]}' is not floating point; gradients exist only for float tensors")
    nodes = list(model.graph.node)
    downstream = set(wrt)
    for node in nodes:
        if any(t in downstream for t in node.input):
            downstream |= {t for t in node.output if t in floats}
    upstream = {output}
    for node in reversed(nodes):
        if any(t in upstream for t in node.output):
            upstream |= set(node.input)
    relevant = downstream & upstream
    on_path = [n for n in nodes if any(t in relevant for t in n.output) and any(t in relevant for t in n.input)]
    for node in on_path:
        if node.domain not in ("", "ai.onnx") or node.op_type not in BACKWARD:
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise OnnxPruneError(
                f"no gradient rule for {op} (node {node.name or node.output[0]}); it lies between the "
                f"requested tensors and the loss: ask for gradients of tensors after it, or add a rule to "
                f"onnxprune.train.autodiff.BACKWARD")
    return _Plan(relevant, on_path, types)


def differentiable(proto: onnx.ModelProto, output: str | None = None) -> set[str]:
    """Float tensors that may be passed in ``wrt`` for ``output`` (default: the first graph output):
    every path from them to the output runs through ops with a rule. Tensors on no path are
    included (their gradient is zero)."""
    output = output or proto.graph.output[0].name
    floats, _ = _float_tensors(proto)
    nodes = list(proto.graph.node)
    upstream = {output}
    for node in reversed(nodes):
        if any(t in upstream for t in node.output):
            upstream |= set(node.input)
    blocked: set[str] = set()
    for node in reversed(nodes):
        outs = [t for t in node.output if t in floats and t in upstream]
        ruled = node.domain in ("", "ai.onnx") and node.op_type in BACKWARD
        if outs and (not ruled or any(t in blocked for t in outs)):
            blocked |= set(node.input)
    names = {t for n in nodes for t in n.output} | {i.name for i in proto.graph.input}
    names |= {i.name for i in proto.graph.initializer}
    return {t for t in names if t in floats and t not in blocked}


def _shapes(model: onnx.ModelProto, plan: _Plan) -> tuple[dict[str, list], dict[str, int]]:
    """Static shapes (and element types) from ONNX inference; tensors of path nodes it misses (shape
    arithmetic through int32 Casts, for instance) are measured by one onnxruntime run when the inputs
    have static shapes."""
    shapes, types = ir.infer_shapes(model), dict(plan.types)
    inputs = ir.graph_inputs(model)
    dims = {vi.name: ir.input_dims(vi) for vi in inputs}
    missing = list(dict.fromkeys(t for n in plan.nodes for t in list(n.input) + list(n.output)
                                 if t and (t not in shapes or t not in types)))
    if not missing or not all(isinstance(d, int) and d > 0 for ds in dims.values() for d in ds):
        return shapes, types
    sess = runtime.session(runtime.with_outputs(model, missing), optimize=False)
    feeds = {vi.name: np.zeros(dims[vi.name], dtype=ir.input_dtype(vi)) for vi in inputs}
    for name, value in zip(missing, sess.run(missing, feeds)):
        shapes[name] = list(value.shape)
        types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
    return shapes, types


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: ir.tensor_to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = ir.constant_value(node)
            if value is not None:
                values[node.output[0]] = value
    return values


# ------------------------------------------------------------------ backward pass
def _backward(e: Emitter, model: onnx.ModelProto, plan: _Plan, output: str, seed: str,
              shapes: dict) -> dict[str, str]:
    """Run every rule in reverse order; returns the total gradient of each relevant tensor reached."""
    values = _constant_values(model.graph)
    contributions: dict[str, list[str]] = {output: [seed]}
    totals: dict[str, str] = {}

    def total(name: str) -> str | None:
        if name not in totals and contributions.get(name):
            totals[name] = e.add_all(contributions[name])
        return totals.get(name)

    for node in reversed(plan.nodes):
        gys = [total(t) if t in plan.relevant else None for t in node.output]
        if not any(gys):
            continue
        needed = frozenset(i for i, t in enumerate(node.input) if t in plan.relevant)
        gxs = BACKWARD[node.op_type](RuleContext(node, e, shapes, values, needed), gys)
        for i in sorted(needed):
            if i < len(gxs) and gxs[i]:
                contributions.setdefault(node.input[i], []).append(gxs[i])
    return {name: total(name) for name in list(contributions)}


# ------------------------------------------------------------------ assembly
def _assemble(model: onnx.ModelProto, wrt: list[str], loss: str, output: str, plan: _Plan,
              trainable_as_inputs: bool, temperature: float) -> GradientModel:
    graph = model.graph
    shapes, types = _shapes(model, plan)
    elem = types.get(output, onnx.TensorProto.FLOAT)
    if elem not in FLOAT_TYPES:
        raise OnnxPruneError(f"output '{output}' is not floating point; a loss needs float outputs")
    taken = ({t for n in graph.node for t in list(n.input) + list(n.output)} | {n.name for n in graph.node}
             | {i.name for i in graph.input} | {i.name for i in graph.initializer})
    e = Emitter(elem, _opset(model), taken)

    def fresh_input(base: str) -> str:
        return ir.fresh_name(base, taken)

    parts = LOSSES[loss](e, LossInput(output, shapes.get(output, []), fresh_input, temperature))
    grads = _backward(e, model, plan, output, parts.seed, shapes)
    sources = {t: grads.get(t) or e.zeros_like(t) for t in wrt}
    grad_names = {t: fresh_input(f"{t}_grad") for t in wrt}
    _name_outputs(e, sources, grad_names)
    outputs = [helper.make_tensor_value_info(parts.loss, elem, [])]
    outputs += [helper.make_tensor_value_info(grad_names[t], types.get(t, elem), shapes.get(t)) for t in wrt]
    graph.node.extend(e.nodes)
    graph.initializer.extend(e.inits)
    graph.input.extend(parts.inputs)
    graph.output.extend(outputs)
    params, param_values = _params_to_inputs(graph, wrt) if trainable_as_inputs else ([], {})
    model.ir_version = max(model.ir_version, 7)
    return GradientModel(model, parts.loss, grad_names, parts.descriptions, params, param_values, output,
                         _opset(model))


def _name_outputs(e: Emitter, sources: dict[str, str], names: dict[str, str]) -> None:
    """Give each gradient tensor its output name by renaming the backward node that makes it: an
    Identity to a graph output is a copy in onnxruntime (activation-sized for activation gradients).
    A tensor that is the gradient of several ``wrt`` tensors is renamed once and copied for the rest."""
    produced = {o for n in e.nodes for o in n.output}
    rename: dict[str, str] = {}
    for t, source in sources.items():
        if source in produced and source not in rename:
            rename[source] = names[t]
        else:
            e.nodes.append(helper.make_node("Identity", [rename.get(source, source)], [names[t]],
                                            name=e.fresh("Identity")))
    for node in e.nodes:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
        for i, name in enumerate(node.output):
            node.output[i] = rename.get(name, name)


def _params_to_inputs(graph: onnx.GraphProto, wrt: list[str]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Move the initializers named in ``wrt`` to graph inputs; returns their names and current values."""
    inits = {t.name: t for t in graph.initializer}
    names = [t for t in wrt if t in inits]
    listed = {i.name for i in graph.input}
    values = {}
    for name in names:
        tensor = inits[name]
        values[name] = numpy_helper.to_array(tensor)
        if name not in listed:
            graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    keep = [t for t in graph.initializer if t.name not in set(names)]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return names, values
