"""External data: tensors whose bytes live in files beside the model.

Which files a model references and how many bytes they hold, reading a tensor's value wherever it
lives, weights left on disk by a lazy load (read one tensor at a time, never all at once) and
writing a model as a header plus one data file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import OnnxPruneError
from . import safety
from .proto import all_tensors, copy_header, np_dtype, tensor_bytes

_BASE_KEY = "onnxprune_dir"   # our own external_data key: the folder a lazy tensor's location is relative to
_PACKED = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2", "FLOAT6E2M3",
                                                  "FLOAT6E3M2") if hasattr(onnx.TensorProto, n)}


def has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in all_tensors(proto.graph))


def locations(proto: onnx.ModelProto) -> list[str]:
    """The external data files ``proto`` references (as written in the model), each once, in order."""
    seen: dict[str, None] = {}
    for t in all_tensors(proto.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            seen.setdefault({e.key: e.value for e in t.external_data}.get("location", ""), None)
    return list(seen)


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
    for loc in locations(proto):
        try:
            f = safety.contained(path.parent, loc)
        except ValueError:  # never counted, never read (load refuses such a model)
            continue
        if f.exists():
            total += f.stat().st_size
    return total


def check_locations(proto: onnx.ModelProto, base: str | os.PathLike) -> None:
    """Refuse external data outside the folder ``base`` (onnx's rules, see ``safety.contained``), before
    anything is read, on the eager and the lazy path alike."""
    for loc in locations(proto):
        try:
            safety.contained(base, loc)
        except ValueError as e:
            raise OnnxPruneError(f"{e}; external data must be files inside the model's folder") from None


def tensor_to_array(t: onnx.TensorProto) -> np.ndarray:
    """The tensor's value (read from its file when it is lazy external data: a writable array)."""
    base = lazy_dir(t)
    if base is None:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dtype = np_dtype(t.data_type)
    nbytes = dtype.itemsize * int(np.prod(t.dims, dtype=np.int64))
    # ``length`` is optional (the torch exporter writes one file per tensor with only ``location``)
    if t.data_type in _PACKED or ("length" in info and nbytes != int(info["length"])):
        return numpy_helper.to_array(t, base).copy()
    try:
        path = safety.contained(base, info.get("location", ""))
    except ValueError as e:
        raise OnnxPruneError(f"tensor '{t.name}': {e}") from None
    out = np.empty(tuple(t.dims), dtype=dtype)
    with open(path, "rb") as fh:
        fh.seek(int(info.get("offset", 0)))
        if fh.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
            raise OnnxPruneError(f"external data of '{t.name}' is shorter than its shape")
    return out


# ---------------------------------------------------------------- lazy external data

def mark_lazy(proto: onnx.ModelProto, base: Path) -> None:
    """Leave ``proto``'s external data on disk: each tensor remembers the folder it is read from."""
    for t in all_tensors(proto.graph):
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


def materialize(model):
    """Read a lazy model's weights into its proto (for code that needs them all in memory);
    ``model`` is a :class:`~onnxprune.ir.Model`, returned."""
    for t in all_tensors(model.proto.graph):
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


# ---------------------------------------------------------------- writing

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
    copy_header(proto, header)
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
