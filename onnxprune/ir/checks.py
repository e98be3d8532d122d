"""A model's data checked against itself and against the machine before anything is allocated.

``check_sizes``: every tensor holds the bytes its shape declares (a weight claiming 1e12 elements
without the data is bad input, not a 4 TB allocation). ``check_fits``: an input shape whose tensors
alone would not fit in the memory available is refused before a feed is made. ``check_finite``:
weights of layers and normalisations without NaN or infinity (they are the model's problem, named).
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from ..errors import OnnxPruneError
from . import safety
from .proto import all_tensors, np_dtype

_T = onnx.TensorProto
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
_COMPLEX = {_T.COMPLEX64, _T.COMPLEX128}
# weights whose values a NaN or infinity makes meaningless (attention masks elsewhere may hold -inf)
_WEIGHT_READERS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
                   "BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2),
                   "LayerNormalization": (1, 2)}


def human_bytes(n: float) -> str:
    for unit, div in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _bits(data_type: int) -> int | None:
    """Bits per element of a numeric type (packed 4-bit and 2-bit types included), None for others."""
    name = _T.DataType.Name(data_type)
    if name in ("STRING", "UNDEFINED"):
        return None
    if name.endswith(("4", "E2M1")) and ("INT4" in name or "FLOAT4" in name):
        return 4
    if name in ("INT2", "UINT2"):
        return 2
    if name.startswith("FLOAT6"):
        return 6
    try:
        return np_dtype(data_type).itemsize * 8
    except Exception:
        return None


def declared_bytes(t: onnx.TensorProto) -> int | None:
    """Bytes a tensor's shape and type call for (a Python int: no overflow), None for strings."""
    bits = _bits(t.data_type)
    if bits is None:
        return None
    n = 1
    for d in t.dims:
        n *= int(d)
    return (n * bits + 7) // 8


def present_bytes(t: onnx.TensorProto, base: str | os.PathLike | None) -> int | None:
    """Bytes of data the tensor really has: raw bytes, typed values, or its external file's share."""
    if t.HasField("raw_data"):
        return len(t.raw_data)
    if t.data_location == _T.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        try:
            offset = int(info.get("offset", 0) or 0)
            size = safety.contained(base, info.get("location", "")).stat().st_size if base is not None else None
            length = int(info["length"]) if info.get("length") else None
        except (OSError, ValueError):
            return None
        if size is None:
            return length
        return max(0, size - offset) if length is None else min(length, max(0, size - offset))
    bits = _bits(t.data_type)
    if bits is None or bits < 8:  # packed types in typed fields: not checked here
        return None
    count = sum(len(getattr(t, f)) for f in _TYPED_FIELDS)
    return count * bits // 8 // (2 if t.data_type in _COMPLEX else 1)  # complex: two numbers per element


def check_sizes(proto: onnx.ModelProto, base: str | os.PathLike | None = None) -> None:
    """Refuse a tensor whose declared shape needs more bytes than the model holds for it."""
    for t in all_tensors(proto.graph):
        if any(d < 0 for d in t.dims):
            raise OnnxPruneError(f"tensor '{t.name}' has a negative dimension {list(t.dims)}")
        want = declared_bytes(t)
        if not want:
            continue
        have = present_bytes(t, base)
        if have is not None and have < want:
            raise OnnxPruneError(
                f"tensor '{t.name}' declares shape {list(t.dims)} ({human_bytes(want)}) but the model holds "
                f"{human_bytes(have)} of data for it; the file is damaged or was not exported completely")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable, else free pages), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(proto: onnx.ModelProto, shapes: dict[str, list[int]]) -> None:
    """Refuse input shapes whose input tensors alone would take more than half the available memory
    (intermediate tensors need several times more): one line instead of a failed allocation."""
    avail = available_memory()
    if avail is None:
        return
    types = {vi.name: vi.type.tensor_type.elem_type for vi in proto.graph.input}
    total = 0
    for name, dims in shapes.items():
        n = 1
        for d in dims:
            n *= int(d)
        bits = _bits(types.get(name) or _T.FLOAT) or 32
        total += n * bits // 8
    if total > avail // 2:
        spec = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items())
        raise OnnxPruneError(f"input shape {spec} needs {human_bytes(total)} for the inputs alone, more than half "
                             f"of the {human_bytes(avail)} of memory available; use smaller sizes")


def check_finite(proto: onnx.ModelProto) -> None:
    """Refuse NaN or infinite values in the weights of Conv/Gemm/MatMul layers and normalisations (named).
    Weights still on disk (a lazily loaded model) are not read for this."""
    inits = {t.name: t for t in proto.graph.initializer}
    seen: set[str] = set()
    for node in proto.graph.node:
        for i in _WEIGHT_READERS.get(node.op_type, ()):
            name = node.input[i] if i < len(node.input) else ""
            t = inits.get(name)
            if t is None or name in seen or t.data_location == _T.EXTERNAL and not t.HasField("raw_data"):
                continue
            seen.add(name)
            if t.data_type not in (_T.FLOAT, _T.DOUBLE, _T.FLOAT16, _T.BFLOAT16):
                continue
            a = np.asarray(onnx.numpy_helper.to_array(t), dtype=np.float64 if t.data_type == _T.DOUBLE
                           else np.float32)
            bad = ~np.isfinite(a)
            if bad.any():
                kind = "NaN" if np.isnan(a[bad]).any() else "infinite"
                raise OnnxPruneError(f"weight '{name}' of {node.op_type} '{node.name}' holds {int(bad.sum())} "
                                     f"{kind} value(s); the model itself is broken (repair or re-export it)")
