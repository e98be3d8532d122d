"""Model I/O and the in-memory graph: the only module that touches onnx and graphsurgeon.

``load`` reads a model (with external data), ``to_graph`` gives an editable
graphsurgeon graph with every ``Constant`` node's value lifted to a constant
tensor, ``from_graph`` turns an edited graph back into a model that keeps the
original's opsets, IR version and metadata, and ``save`` writes atomically.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from ..errors import OnnxPruneError
from . import safety

TWO_GB = 2**31
CHECK_WEIGHTS_BYTES = 2**26  # larger models are checked without their weights (see check)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class Model:
    """A loaded ONNX model and where it came from."""

    proto: onnx.ModelProto
    path: Path | None = None
    file_bytes: int = 0
    meta: dict = field(default_factory=dict)
    external: bool = False   # weights were read from external data files (saving keeps that layout)
    stamp: tuple | None = None   # (file mtime, size, structure digest) at load: is the file still the proto?

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def opset(self) -> int:
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0


def model_size_bytes(path: str | os.PathLike, proto: onnx.ModelProto | None = None) -> int:
    """Bytes on disk of a model file plus the external data files it references
    (read from ``proto`` when given, else from the file's header)."""
    path = Path(path)
    total = path.stat().st_size
    if proto is None:
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception:
            return total
    for loc in external_locations(proto):
        f = path.parent / loc
        if f.exists():
            total += f.stat().st_size
    return total


def external_locations(proto: onnx.ModelProto) -> set[str]:
    """The external data file names (relative to the model's folder) that ``proto``'s tensors reference."""
    return {loc for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
            for loc in [{e.key: e.value for e in t.external_data}.get("location")] if loc}


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def load(path: str | os.PathLike, *, lazy: bool = False) -> Model:
    """Load a model with its external data; user errors become :class:`OnnxPruneError`.

    ``lazy``: a model with ``LAZY_BYTES`` or more of external data keeps it on disk; each weight
    is read when it is used (:func:`tensor_to_array`, graphsurgeon values, sessions, save), so the
    weights are never all held in memory at once (see :func:`materialize`).
    """
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory, expected an .onnx file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(1)
    except OSError as e:
        raise OnnxPruneError(f"{p}: cannot read ({e.strerror})") from None
    if not head:
        raise OnnxPruneError(f"{p}: file is empty, expected an ONNX model")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:
        raise OnnxPruneError(f"{p}: not a valid ONNX model (protobuf parse failed; is the file truncated?)") from None
    if not proto.HasField("graph") or (len(proto.graph.node) == 0 and len(proto.graph.output) == 0):
        raise OnnxPruneError(f"{p}: not an ONNX model (no graph found)")
    missing = []
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if not (p.parent / loc).exists():
                missing.append(loc)
    if missing:
        raise OnnxPruneError(
            f"{p}: external data file '{sorted(set(missing))[0]}' is missing; keep it next to the model"
        )
    external = _has_external(proto)
    size = model_size_bytes(p, proto)  # from the header, before the data is read in
    try:
        if lazy and external and size >= LAZY_BYTES:
            _mark_lazy(proto, p.parent)
        else:
            onnx.load_external_data_for_model(proto, str(p.parent))
    except Exception as e:  # unreadable or short external data
        raise OnnxPruneError(f"{p}: cannot read external data ({e})") from None
    try:
        check_structure(proto)
    except Exception as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise OnnxPruneError(f"{p}: onnx.checker rejects the model ({why}); repair or re-export it") from None
    st = p.stat()
    return Model(proto=proto, path=p, file_bytes=size, external=external,
                 stamp=(st.st_mtime_ns, st.st_size, structure_digest(proto)))


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


def structure_digest(proto: onnx.ModelProto) -> int:
    """A digest of the nodes, inputs, outputs and initializer names/shapes (not the weights' values);
    stable within one process (Python's hash of bytes)."""
    g = proto.graph
    parts = [item.SerializeToString() for part in (g.node, g.input, g.output) for item in part]
    parts += [f"{t.name}:{t.data_type}:{list(t.dims)};".encode() for t in g.initializer]
    return hash(b"\x00".join(parts))


def file_bytes(model: Model, *, mapped: bool = False) -> bytes | mmap.mmap | None:
    """The bytes of the file ``model`` was loaded from, if the file is unchanged and ``model.proto``
    still has the structure it had then (same nodes, inputs, outputs, initializer names and shapes);
    else ``None``. With external data that is the model file only, the weights staying where they are.
    ``mapped``: the file memory-mapped read-only instead of read (no copy; the caller closes it)."""
    if model.stamp is None or model.path is None or model.stamp[1] == 0:
        return None
    try:
        st = model.path.stat()
        if (st.st_mtime_ns, st.st_size) != model.stamp[:2] or structure_digest(model.proto) != model.stamp[2]:
            return None
        if mapped:
            with open(model.path, "rb") as fh:
                return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        data = model.path.read_bytes()
    except (OSError, ValueError):
        return None
    return data if len(data) == model.stamp[1] else None


def serialized(model: Model | onnx.ModelProto) -> bytes:
    """The serialized model with its weights: the file's own bytes when ``model`` was loaded from a
    file without external data that still matches it (no serialization), else ``SerializeToString``."""
    if isinstance(model, Model):
        data = None if model.external else file_bytes(model)
        if data is not None:
            return data
        model = model.proto
    return model.SerializeToString()


def proto_bytes(proto: onnx.ModelProto) -> int:
    """Size of ``proto`` from its initializers' shapes plus its nodes, without serializing the weights
    (``ByteSize()`` of the python protobuf serializes the whole model: a copy, and it fails over 2 GB)."""
    return sum(tensor_bytes(t) for t in proto.graph.initializer) + sum(n.ByteSize() for n in proto.graph.node)


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's data from its shape and type (strings: their serialized size)."""
    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return t.ByteSize()
    return int(np.prod(t.dims, dtype=np.int64)) * np_dtype(t.data_type).itemsize


def check_structure(proto: onnx.ModelProto) -> None:
    """onnx.checker's structural check (nodes, references, order, attributes, opsets) on the
    weight-free skeleton. Value infos without a shape, which onnxruntime accepts, pass."""
    sk = skeleton(proto)
    for vi in list(sk.graph.input) + list(sk.graph.output) + list(sk.graph.value_info):
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(sk, full_check=False)


def check(proto: onnx.ModelProto, full: bool = True, data: bytes | None = None, weights: bool | None = None) -> None:
    """Run onnx.checker. Models of ``CHECK_WEIGHTS_BYTES`` or more (or any, with ``weights=False``)
    are checked on their weight-free skeleton (same graph, large weights as typed inputs): the
    checker would otherwise parse and copy every weight (and cannot take a model over 2 GB at all).
    ``data``: ``proto`` already serialized (the checker then does not serialize it again)."""
    if weights is False or proto_bytes(proto) >= CHECK_WEIGHTS_BYTES or is_lazy(proto):
        onnx.checker.check_model(skeleton(proto), full_check=full)
    else:
        onnx.checker.check_model(proto if data is None else data, full_check=full)


def save(proto: onnx.ModelProto, path: str | os.PathLike, *, source: str | os.PathLike | None = None,
         external: bool = False, data: bytes | None = None) -> int:
    """Write ``proto`` to ``path`` atomically; models over 2 GB (or with ``external=True``)
    get their weights in a ``.data`` file beside them.

    ``data``: ``proto`` already serialized (written as it is, not serialized again).
    Refuses to overwrite ``source`` (the input model). Returns bytes written.
    """
    out = Path(path)
    if source is not None and out.exists() and os.path.samefile(out, source):
        raise OnnxPruneError(f"{out}: output path is the input model; choose another -o path")
    if out.exists() and out.is_dir():
        raise OnnxPruneError(f"{out}: output path is a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxPruneError(f"{parent}: output folder does not exist")
    if not os.access(parent, os.W_OK):
        raise OnnxPruneError(f"{parent}: output folder is not writable")
    big = external or proto_bytes(proto) >= TWO_GB or _has_external(proto)
    data_name = out.name + ".data"
    made = []  # temporary files created exclusively (O_EXCL, unpredictable names): never a planted link
    try:
        fd, tmp = safety.temp_beside(out)
        os.close(fd)
        made.append(tmp)
        if big:  # external data is written under its final name's reference, then both files renamed
            fd, tmp_data = safety.temp_beside(parent / data_name)
            os.close(fd)
            made.append(tmp_data)
            write_external(proto, tmp, data_name, data_file=tmp_data)
            size = os.path.getsize(tmp) + os.path.getsize(tmp_data)
            safety.finish_temp(tmp_data, parent / data_name)
        else:
            with safety.open_new(tmp) as fh:
                fh.write(proto.SerializeToString() if data is None else data)
            size = os.path.getsize(tmp)
        safety.finish_temp(tmp, out)
    except BaseException as e:
        for f in made:
            if os.path.lexists(f):
                os.unlink(f)
        if isinstance(e, OSError):
            raise OnnxPruneError(f"{out}: cannot write the model ({e.strerror or e}); choose another -o folder") \
                from None
        raise
    return size


def write_external(proto: onnx.ModelProto, model_file: str | os.PathLike, data_name: str, *,
                   data_file: str | os.PathLike | None = None, extra: onnx.ModelProto | None = None,
                   threshold: int = 1024) -> None:
    """Write ``proto`` as a model file plus one external data file, without changing ``proto``.

    Initializers of ``threshold`` bytes or more go to ``data_file`` (default: ``data_name``
    beside the model), referenced as ``data_name``; one tensor is copied at a time.
    Initializers that ``proto``'s nodes read but ``proto`` lacks are taken from ``extra``
    (a model and a weight-free variant of it can so share one set of weights).
    """
    header = onnx.ModelProto()
    _copy_header(proto, header)
    for fd, value in proto.graph.ListFields():
        if fd.name == "initializer":
            continue
        target = getattr(header.graph, fd.name)
        if isinstance(value, (str, bytes)):
            setattr(header.graph, fd.name, value)
        elif hasattr(target, "extend"):
            target.extend(value)
        else:
            target.CopyFrom(value)
    tensors = list(proto.graph.initializer)
    if extra is not None:
        have = {t.name for t in tensors}
        wanted = {i for n in proto.graph.node for i in n.input} - have
        tensors += [t for t in extra.graph.initializer if t.name in wanted]
    data_file = Path(data_file) if data_file is not None else Path(model_file).parent / data_name
    with safety.open_new(data_file) as fh:
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL and not t.HasField("raw_data") and lazy_dir(t) is None:
                raise ValueError(f"tensor '{t.name}' has no data in memory")
            if tensor_bytes(t) < threshold or t.data_type == onnx.TensorProto.STRING:
                header.graph.initializer.append(numpy_helper.from_array(tensor_to_array(t), t.name)
                                                if lazy_dir(t) else t)
                if t.data_location == onnx.TensorProto.EXTERNAL:  # stale marking: the data is in memory
                    del header.graph.initializer[-1].external_data[:]
                    header.graph.initializer[-1].data_location = onnx.TensorProto.DEFAULT
                continue
            raw = t.raw_data if t.HasField("raw_data") else \
                memoryview(np.ascontiguousarray(tensor_to_array(t)).reshape(-1).view(np.uint8))
            ref = header.graph.initializer.add()
            ref.name, ref.data_type, ref.doc_string = t.name, t.data_type, t.doc_string
            ref.dims.extend(t.dims)
            ref.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", fh.tell()), ("length", len(raw))):
                e = ref.external_data.add()
                e.key, e.value = key, str(value)
            fh.write(raw)
            del raw
    with safety.open_new(model_file) as fh:
        fh.write(header.SerializeToString())


def _has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto.graph))


# ---------------------------------------------------------------- graphsurgeon layer

def to_graph(model: Model | onnx.ModelProto) -> gs.Graph:
    """An editable graph; ``Constant`` nodes (Paddle, TF exports) become constant tensors."""
    proto = model.proto if isinstance(model, Model) else model
    graph = gs.import_onnx(proto)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and type(t._values) is gs.ir.tensor.LazyValues \
                and lazy_dir(t._values.tensor) is not None:
            t._values = _DiskValues(t._values.tensor)
    lift_constants(graph)
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


def lift_constants(graph: gs.Graph) -> int:
    """Turn ``Constant`` nodes into constant tensors of the same name; returns how many."""
    n = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        value = constant_node_value(node)
        if value is None:
            continue
        out = node.outputs[0]
        const = gs.Constant(out.name, np.asarray(value))
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


def constant_node_value(node: gs.Node):
    attrs = node.attrs
    if "value" in attrs:
        v = attrs["value"]
        return v.values if isinstance(v, gs.Constant) else np.asarray(v)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def from_graph(graph: gs.Graph, template: Model | onnx.ModelProto) -> onnx.ModelProto:
    """A model from an edited graph, keeping the template's IR version, opsets and metadata."""
    tmpl = template.proto if isinstance(template, Model) else template
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = onnx.ModelProto()
    _copy_header(tmpl, out)  # never copy the template's graph (and its weights) only to replace it
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


def _copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, name, getattr(src, name))
    dst.opset_import.extend(src.opset_import)
    dst.metadata_props.extend(src.metadata_props)
    dst.functions.extend(src.functions)


# ---------------------------------------------------------------- shapes

_SHAPE_RE = re.compile(r"^(?P<name>.+)=(?P<dims>\d+(?:[x,]\d+)*)$")


def parse_input_shapes(specs: list[str] | None) -> dict[str, list[int]]:
    """``["input=1x3x224x224"]`` -> ``{"input": [1, 3, 224, 224]}``."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        m = _SHAPE_RE.match(spec.strip())
        if not m:
            raise OnnxPruneError(f"--input-shape '{spec}': expected NAME=DxDxD, e.g. input=1x3x224x224")
        dims = [int(d) for d in re.split(r"[x,]", m.group("dims"))]
        if any(d <= 0 for d in dims):
            raise OnnxPruneError(f"--input-shape '{spec}': dimensions must be positive")
        shapes[m.group("name")] = dims
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


def resolve_input_shapes(proto: onnx.ModelProto, overrides: dict[str, list[int]] | None = None,
                         default_dim: int = 1) -> dict[str, list[int]]:
    """Concrete shapes for every graph input: overrides first, symbolic dims become ``default_dim``."""
    overrides = dict(overrides or {})
    inputs = graph_inputs(proto)
    names = [i.name for i in inputs]
    unknown = [n for n in overrides if n not in names]
    if unknown:
        raise OnnxPruneError(
            f"--input-shape names '{unknown[0]}', but the model's inputs are: {', '.join(names)}")
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
            shapes[vi.name] = [d if isinstance(d, int) and d > 0 else default_dim for d in dims]
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
    _copy_header(proto, m)
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
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = (list(a.t.dims), a.t.data_type)
    return {n: v for n, v in out.items() if v[0] is not None}


def np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def input_dtype(vi: onnx.ValueInfoProto) -> np.dtype:
    return np_dtype(vi.type.tensor_type.elem_type)


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's value (read from its file when it is lazy external data: a writable array)."""
    base = lazy_dir(t)
    if base is None:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = np_dtype(t.data_type)
    if t.data_type in _PACKED or dtype.itemsize * int(np.prod(t.dims, dtype=np.int64)) != int(info["length"]):
        return numpy_helper.to_array(t, base).copy()
    out = np.empty(tuple(t.dims), dtype=dtype)
    with open(os.path.join(base, info["location"]), "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        if fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise OnnxPruneError(f"external data of '{t.name}' is shorter than its shape")
    return out


# ---------------------------------------------------------------- lazy external data

LAZY_BYTES = 2**28      # models with this much external data keep it on disk (load(lazy=True))
_BASE_KEY = "onnxprune_dir"   # our own external_data key: the folder a lazy tensor's location is relative to
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3",
                                                  "FLOAT6E3M2") if hasattr(onnx.TensorProto, n)}


def _mark_lazy(proto: onnx.ModelProto, base: Path) -> None:
    for t in _all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            e = t.external_data.add()
            e.key, e.value = _BASE_KEY, str(base.resolve())


def lazy_dir(t: onnx.TensorProto) -> str | None:
    """The folder of a tensor whose external data was left on disk by ``load(lazy=True)``, else None."""
    if t.data_location != onnx.TensorProto.EXTERNAL or t.HasField("raw_data"):
        return None
    return next((e.value for e in t.external_data if e.key == _BASE_KEY), None)


def is_lazy(proto: onnx.ModelProto) -> bool:
    return any(lazy_dir(t) is not None for t in proto.graph.initializer)


def materialize(model: Model) -> Model:
    """Read a lazy model's weights into its proto (for code that needs them all in memory)."""
    for t in _all_tensors(model.proto.graph):
        base = lazy_dir(t)
        if base is not None:
            keep = [(e.key, e.value) for e in t.external_data if e.key != _BASE_KEY]
            del t.external_data[:]
            for k, v in keep:
                e = t.external_data.add()
                e.key, e.value = k, v
            onnx.external_data_helper.load_external_data_for_tensor(t, base)
            del t.external_data[:]
            t.data_location = onnx.TensorProto.DEFAULT
    return model


class _DiskValues(gs.ir.tensor.LazyValues):
    """graphsurgeon's lazy constant values for a tensor whose data is still on disk."""

    def load(self):
        return tensor_to_array(self.tensor)
