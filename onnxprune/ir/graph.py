"""The editable graph: graphsurgeon conversion both ways.

``to_graph`` gives a graphsurgeon graph with every ``Constant`` node's value lifted to a constant
tensor, unique node names and weights still on disk left there; ``from_graph`` turns an edited
graph back into a model that keeps the original's opsets, IR version and metadata, copying each
weight once.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from . import external
from .constants import constant_value
from .files import Model
from .proto import copy_header

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def to_graph(model: Model | onnx.ModelProto) -> gs.Graph:
    """An editable graph; ``Constant`` nodes (Paddle, TF exports) become constant tensors."""
    proto = model.proto if isinstance(model, Model) else model
    graph = gs.import_onnx(proto)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(t._values) is gs.ir.tensor.LazyValues \
                and external.lazy_dir(t._values.tensor) is not None:
            t._values = _DiskValues(t._values.tensor)
    _lift_constants(graph, {n.output[0]: n for n in proto.graph.node
                            if n.op_type == "Constant" and len(n.output) == 1})
    name_nodes(graph)
    return graph


def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, deterministic name (exporters leave some empty or repeated)."""
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = f"{node.op}_{i}"
            name, k = base, 0
            while name in seen:
                k += 1
                name = f"{base}_{k}"
            node.name = name
        seen.add(node.name)


def _lift_constants(graph: gs.Graph, nodes: dict[str, onnx.NodeProto]) -> int:
    """Turn ``Constant`` nodes into constant tensors of the same name (values read from ``nodes``,
    the model's Constant nodes by output name); returns how many."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1 or node.outputs[0].name not in nodes:
            continue
        out = node.outputs[0]
        value = constant_value(nodes[out.name])
        if value is None:
            continue
        const = gs.Constant(out.name, value)
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = const
        for i, t in enumerate(graph.outputs):
            if t is out:
                graph.outputs[i] = const
        node.outputs.clear()
        n += 1
    n += _share_identity_constants(graph)
    if n:
        graph.cleanup(remove_unused_graph_inputs=False)
    return n


def _share_identity_constants(graph: gs.Graph) -> int:
    """``Identity(constant)`` feeding layers is how the torch exporter shares deduplicated initializers:
    give the consumers the constant itself (a shared constant; the rewrite copies it where uses differ)."""
    outputs = {id(t) for t in graph.outputs}
    n = 0
    for node in list(graph.nodes):
        if node.op != "Identity" or not node.inputs or not isinstance(node.inputs[0], gs.Constant):
            continue
        out = node.outputs[0]
        if id(out) in outputs:
            continue
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = node.inputs[0]
        node.outputs.clear()
        n += 1
    return n


def from_graph(graph: gs.Graph, template: Model | onnx.ModelProto) -> onnx.ModelProto:
    """A model from an edited graph, keeping the template's IR version, opsets and metadata."""
    tmpl = template.proto if isinstance(template, Model) else template
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = onnx.ModelProto()
    copy_header(tmpl, out)  # never copy the template's graph (and its weights) only to replace it
    _export_graph(graph, out.graph)
    _hoist_subgraph_initializers(out.graph)
    return out


def _export_graph(graph: gs.Graph, g: onnx.GraphProto) -> None:
    """graphsurgeon's export written straight into ``g``: each weight is copied once (untouched
    ones from their original TensorProto), where ``gs.export_onnx`` copies every weight three
    times (list, ``make_graph``, ``make_model``). Value infos are left out: the graph changed
    shape, they are re-inferred."""
    ex = gs.exporters.onnx_exporter.OnnxExporter
    g.name = graph.name or ""
    if graph.doc_string:
        g.doc_string = graph.doc_string
    g.node.extend(ex.export_node(n) for n in graph.nodes)
    g.input.extend(ex.export_value_info_proto(t, False) for t in graph.inputs)
    g.output.extend(ex.export_value_info_proto(t, False) for t in graph.outputs)
    for t in graph.tensors().values():
        if not isinstance(t, gs.Constant):
            continue
        values = t._values
        if isinstance(values, gs.ir.tensor.SparseValues):
            g.sparse_initializer.append(values.tensor)
        elif isinstance(values, _DiskValues):  # the new model holds its weights (it is saved elsewhere)
            _add_array(g, t.name, values.load())
        elif isinstance(values, gs.ir.tensor.LazyValues):
            g.initializer.append(values.tensor)
            g.initializer[-1].name = t.name
        elif _same_export_dtype(t):
            _add_array(g, t.name, np.asarray(values))
        else:  # graphsurgeon converts float32 values to the tensor's storage type (bfloat16, float8)
            g.initializer.append(ex.export_tensor_proto(t))
            g.initializer[-1].data_location = onnx.TensorProto.DEFAULT


def _same_export_dtype(t: gs.Constant) -> bool:
    to_onnx = gs.exporters.onnx_exporter.dtype_to_onnx
    return to_onnx(t.dtype) == to_onnx(getattr(t, "export_dtype", t.dtype))


def _add_array(g: onnx.GraphProto, name: str, values: np.ndarray) -> None:
    """Append ``values`` as an initializer, written in place (plain numeric types) rather than built and copied."""
    if values.dtype.kind not in "biuf" or values.dtype.byteorder == ">" or values.dtype.itemsize > 8:
        g.initializer.append(numpy_helper.from_array(values, name))  # strings, ml_dtypes, ...
        return
    t = g.initializer.add()
    t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(values.dtype)
    t.dims.extend(values.shape)
    t.raw_data = np.ascontiguousarray(values).tobytes()


def _hoist_subgraph_initializers(graph: onnx.GraphProto) -> None:
    """graphsurgeon exports an outer-scope constant read inside a subgraph as an initializer of
    every subgraph that reads it (an LSTM weight used by both branches of an If is stored twice).
    Names are unique across scopes, so each moves to the main graph once."""
    have = {t.name for t in graph.initializer}
    stack = [graph]
    while stack:
        for node in stack.pop().node:
            for a in node.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
                    for t in sub.initializer:
                        if t.name not in have:
                            have.add(t.name)
                            graph.initializer.append(t)
                    del sub.initializer[:]
                    stack.append(sub)


class _DiskValues(gs.ir.tensor.LazyValues):
    """graphsurgeon's lazy constant values for a tensor whose data is still on disk."""

    def load(self):
        return external.tensor_to_array(self.tensor)
