"""Model files: :class:`Model` (a loaded proto and where it came from), ``load`` with its checks,
``check`` (onnx.checker, on a weight-free skeleton for large models), atomic ``save``, and the
loaded file's own bytes while the proto still matches it (no re-serialization)."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import OnnxPruneError
from . import checks, limits, safety
from .external import (check_locations, has_external, is_lazy, locations, mark_lazy, model_size_bytes,
                       write_external)
from .ortops import contrib_ops, for_checker, note, ort_load
from .proto import proto_bytes
from .shapes import skeleton


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


def load(path: str | os.PathLike, *, lazy: bool = False) -> Model:
    """Load a model with its external data; user errors become :class:`OnnxPruneError`.

    ``lazy``: a model with ``limits.LAZY_BYTES`` or more of external data keeps it on disk; each
    weight is read when it is used (``external.tensor_to_array``, graphsurgeon values, sessions,
    save), so the weights are never all held in memory at once (see ``external.materialize``).
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
    try:
        check_locations(proto, p.parent)
    except OnnxPruneError as e:
        raise OnnxPruneError(f"{p}: {e}") from None
    missing = [loc for loc in locations(proto) if not (p.parent / loc).exists()]
    if missing:
        raise OnnxPruneError(
            f"{p}: external data file '{sorted(set(missing))[0]}' is missing; keep it next to the model"
        )
    stored_apart = has_external(proto)
    size = model_size_bytes(p, proto)  # from the header, before the data is read in
    try:
        if lazy and stored_apart and size >= limits.LAZY_BYTES:
            mark_lazy(proto, p.parent)
        else:
            onnx.load_external_data_for_model(proto, str(p.parent))
    except Exception as e:  # unreadable or short external data
        raise OnnxPruneError(f"{p}: cannot read external data ({e})") from None
    try:
        checks.check_sizes(proto, p.parent)
    except OnnxPruneError as e:
        raise OnnxPruneError(f"{p}: {e}") from None
    try:
        check_structure(proto)
    except Exception as e:
        why = " ".join(str(e).split())[:300] or type(e).__name__
        raise OnnxPruneError(f"{p}: onnx.checker rejects the model ({why}); repair or re-export it") from None
    meta = {}
    ops = contrib_ops(proto)
    if ops:  # what the checker cannot judge, onnxruntime's load does
        ort_load(str(p), str(p))
        meta["validity"] = note(ops)
    st = p.stat()
    return Model(proto=proto, path=p, file_bytes=size, external=stored_apart, meta=meta,
                 stamp=(st.st_mtime_ns, st.st_size, structure_digest(proto)))


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


def check_structure(proto: onnx.ModelProto) -> None:
    """onnx.checker's structural check (nodes, references, order, attributes, opsets) on the
    weight-free skeleton. Value infos without a shape, which onnxruntime accepts, pass, and so do
    onnxruntime's contrib ops (see ``ortops``: its load checks them)."""
    sk = for_checker(skeleton(proto))
    for vi in list(sk.graph.input) + list(sk.graph.output) + list(sk.graph.value_info):
        if vi.type.HasField("tensor_type") and not vi.type.tensor_type.HasField("shape"):
            vi.type.tensor_type.shape.SetInParent()
    onnx.checker.check_model(sk, full_check=False)


def check(proto: onnx.ModelProto, full: bool = True, data: bytes | None = None, weights: bool | None = None) -> None:
    """Run onnx.checker. Models of ``limits.CHECK_WEIGHTS_BYTES`` or more (or any, with ``weights=False``)
    are checked on their weight-free skeleton (same graph, large weights as typed inputs): the
    checker would otherwise parse and copy every weight (and cannot take a model over 2 GB at all).
    ``data``: ``proto`` already serialized (the checker then does not serialize it again).
    onnxruntime's contrib ops pass (see ``ortops``): the caller loads such a model in onnxruntime."""
    if weights is False or proto_bytes(proto) >= limits.CHECK_WEIGHTS_BYTES or is_lazy(proto) or \
            contrib_ops(proto):
        onnx.checker.check_model(for_checker(skeleton(proto)), full_check=full)
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
    big = external or proto_bytes(proto) >= limits.TWO_GB or has_external(proto)
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
