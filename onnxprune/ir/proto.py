"""ModelProto helpers with no policy: element types, tensor sizes, walking every tensor of a graph
(subgraphs included), how often each name is read, copying a model's header."""

from __future__ import annotations

import numpy as np
import onnx


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its shape and type (strings: their serialized size)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return t.ByteSize()
    return int(np.prod(t.dims, dtype=np.int64)) * np_dtype(t.data_type).itemsize


def proto_bytes(proto: onnx.ModelProto) -> int:
    """Size of ``proto`` from its initializers' shapes plus its nodes, without serializing the weights
    (``ByteSize()`` of the python protobuf serializes the whole model: a copy, and it fails over 2 GB)."""
    return sum(tensor_bytes(t) for t in proto.graph.initializer) + sum(n.ByteSize() for n in proto.graph.node)


def all_tensors(graph: onnx.GraphProto):
    """Every tensor of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_tensors(g)


def read_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many times each name is read: node inputs (inside subgraphs too) and graph outputs."""
    count: dict[str, int] = {}

    def walk(g: onnx.GraphProto):
        for n in g.node:
            for i in n.input:
                if i:
                    count[i] = count.get(i, 0) + 1
            for a in n.attribute:
                for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    walk(sub)
    walk(graph)
    for o in graph.output:
        count[o.name] = count.get(o.name, 0) + 1
    return count


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... : the first name not in ``taken``, which then holds it."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Everything of ``src`` but its graph: IR version, producer, opsets, metadata, functions."""
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, name, getattr(src, name))
    dst.opset_import.extend(src.opset_import)
    dst.metadata_props.extend(src.metadata_props)
    dst.functions.extend(src.functions)
