"""Input shapes and shape inference: the model's real inputs and their dimensions, ``--input-shape``
specs, concrete shapes for symbolic ones, and ONNX shape inference run on a weight-free skeleton."""

from __future__ import annotations

import re

import numpy as np
import onnx

from ..errors import OnnxPruneError
from . import checks
from .constants import constant_tensor
from .proto import copy_header, np_dtype

_SHAPE_RE = re.compile(r"^(?P<name>.+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["input=1x3x224x224"]`` -> ``{"input": [1, 3, 224, 224]}``. NAME may also be a symbolic
    dimension (``past_sequence_length=0``), bound in every input that has it (see
    :func:`resolve_input_shapes`). Zero is a size like any other (an empty KV cache); the model's
    fixed dimensions are checked there."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        m = _SHAPE_RE.match(spec.strip())
        if not m:
            raise OnnxPruneError(f"--input-shape '{spec}': expected NAME=DxDxD, e.g. input=1x3x224x224, or "
                                 "DIM=N for a named dimension, e.g. past_sequence_length=0")
        shapes[m.group("name")] = [int(d) for d in re.split(r"[x,]", m.group("dims"))]
    return shapes


def graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Real inputs (not initializers listed as inputs, as old exporters do)."""
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def input_dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def is_mask_input(vi: onnx.ValueInfoProto) -> bool:
    """An integer or boolean input named like an attention mask: synthetic feeds fill it with ones (zeros
    can mask every position, and onnxruntime's attention then refuses the batch or reads nothing)."""
    return input_dtype(vi).kind in "iub" and "mask" in vi.name.lower()


def resolve_input_shapes(proto: onnx.ModelProto, overrides: dict[str, list[int]] | None = None,
                         default_dim: int = 1) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: overrides first (an input's whole shape, or the size of a
    named symbolic dimension wherever it appears), other symbolic dims become ``default_dim``."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(proto)
    names = [i.name for i in inputs]
    params = {d for vi in inputs for d in input_dims(vi) if isinstance(d, str)}
    named = {n: v for n, v in overrides.items() if n not in names and n in params}
    unknown = [n for n in overrides if n not in names and n not in params]
    if unknown:
        dims = f"; its named dimensions: {', '.join(sorted(params))}" if params else ""
        raise OnnxPruneError(
            f"--input-shape names '{unknown[0]}', but the model's inputs are: {', '.join(names)}{dims}")
    for n, v in named.items():
        if len(v) != 1:
            raise OnnxPruneError(f"--input-shape {n}: a named dimension takes one size, e.g. {n}=8")
        del overrides[n]
    shapes = {}
    for vi in inputs:
        dims = input_dims(vi)
        if vi.name in overrides:
            want = overrides[vi.name]
            if dims and len(want) != len(dims):
                raise OnnxPruneError(
                    f"--input-shape {vi.name}: rank {len(want)} given, the model's input has rank {len(dims)}")
            for w, d in zip(want, dims):
                if isinstance(d, int) and d > 0 and d != w:
                    raise OnnxPruneError(
                        f"--input-shape {vi.name}: dimension {w} conflicts with the model's fixed {d}")
            shapes[vi.name] = list(want)
        else:
            shapes[vi.name] = [d if isinstance(d, int) and d > 0 else named[d][0] if d in named else default_dim
                               for d in dims]
    checks.check_fits(proto, shapes)
    return shapes


def with_input_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``proto`` whose inputs have the given concrete shapes (for analysis only)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[vi.name]:
                dims.add().dim_value = int(d)
    return m


def skeleton(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
             max_elements: int = 4096) -> onnx.ModelProto:
    """A weight-free copy for shape and type inference.

    Large initializers become graph inputs of the same name, type and shape (shape
    inference needs only those); small ones (shape constants) keep their values.
    ``input_shapes`` overrides the inputs' dimensions.
    """
    src = proto.graph
    m = onnx.ModelProto()
    copy_header(proto, m)
    g = m.graph
    g.name = src.name
    g.node.extend(src.node)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    init_names = {t.name for t in src.initializer}
    for vi in src.input:
        if vi.name in init_names:
            continue
        new = g.input.add()
        new.CopyFrom(vi)
        if input_shapes and vi.name in input_shapes:
            dims = new.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[vi.name]:
                dims.add().dim_value = int(d)
    for t in src.initializer:
        if int(np.prod(t.dims)) <= max_elements and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def infer_shapes(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
                 ) -> dict[str, list[int | None]]:
    """Tensor name -> shape after ONNX shape inference (unknown dims are None)."""
    return {n: s for n, (s, _) in infer(proto, input_shapes).items()}


def infer(proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
          ) -> dict[str, tuple[list[int | None], int]]:
    """Tensor name -> (shape, ONNX element type) after shape inference on the model's skeleton."""
    sk = skeleton(proto, input_shapes)
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, check_type=False, strict_mode=False, data_prop=True)
    except Exception:
        inferred = sk
    out: dict[str, tuple[list[int | None], int]] = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
                if t.HasField("shape") else None
            out[vi.name] = (shape, t.elem_type)
    for init in inferred.graph.initializer:
        out[init.name] = (list(init.dims), init.data_type)
    for node in inferred.graph.node:  # Constant nodes: their values are known exactly
        if node.op_type == "Constant" and len(node.output) == 1:
            t = constant_tensor(node)
            if t is not None:
                out[node.output[0]] = (list(t.dims), t.data_type)
    return {n: v for n, v in out.items() if v[0] is not None}


def input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np_dtype(vi.type.tensor_type.elem_type)
