"""``.npz`` files and random feeds as :class:`~onnxprune.data.arrays.ArrayData`, and the analysis
shapes a model gets from its data.

The convention everywhere: an ``.npz`` whose arrays are named after the
model's inputs (a single-input model may use any one name) plus an optional
integer array ``labels``. ``random`` gives synthetic inputs from the input
shapes, and the report says so. Image folders are ``data.images``; the front
door over all of them is ``data.open_data``.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx

from .. import ir
from ..errors import OnnxPruneError
from ..ir.checks import available_memory, human_bytes
from .arrays import ArrayData


def load_npz(path: str | Path, proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None) -> ArrayData:
    """Read an .npz following the data convention and check it against the model's inputs."""
    p = Path(path)
    if not p.exists():
        raise OnnxPruneError(f"{p}: no such data file")
    if p.is_dir():
        raise OnnxPruneError(f"{p}: is a directory; pass an .npz file (open image folders with data.open_data)")
    try:
        arrays = read_npz(p)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise OnnxPruneError(f"{p}: not a readable .npz file ({e.__class__.__name__})") from None
    return checked_arrays(arrays, proto, input_shapes, str(p))


def checked_arrays(arrays: dict[str, np.ndarray], proto: onnx.ModelProto,
                   input_shapes: dict[str, list[int]] | None = None, source: str = "arrays") -> ArrayData:
    """Arrays (and optional int ``labels``) checked against the model's inputs, as for an .npz: names, shapes,
    dtypes (numeric ones converted), finite values. ``source`` names them in messages."""
    p = source
    arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
    labels = arrays.pop("labels", None)
    inputs = ir.graph_inputs(proto)
    names = [i.name for i in inputs]
    if len(inputs) == 1 and names[0] not in arrays:
        if len(arrays) != 1:
            raise OnnxPruneError(
                f"{p}: expected one array named '{names[0]}' (the model's input), found {sorted(arrays) or 'none'}")
        arrays = {names[0]: next(iter(arrays.values()))}
    missing = [n for n in names if n not in arrays]
    if missing:
        raise OnnxPruneError(f"{p}: no array for model input '{missing[0]}' (arrays: {sorted(arrays)})")
    arrays = {n: arrays[n] for n in names}
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(counts) != 1 or 0 in counts:
        raise OnnxPruneError(f"{p}: input arrays must share a non-empty first (batch) dimension")
    for vi in inputs:
        a = arrays[vi.name]
        want = ir.input_dtype(vi)
        if a.dtype != want:
            if a.dtype.kind == want.kind or (a.dtype.kind in "iuf" and want.kind == "f"):
                arrays[vi.name] = a.astype(want)
            else:
                raise OnnxPruneError(f"{p}: array '{vi.name}' has dtype {a.dtype}, the model wants {want}")
        dims = ir.input_dims(vi)
        if dims and a.ndim != len(dims):
            raise OnnxPruneError(
                f"{p}: array '{vi.name}' has shape {list(a.shape)}, the model wants rank {len(dims)} ({dims})")
        for i, d in enumerate(dims[1:], start=1):
            fixed = (input_shapes or {}).get(vi.name, [None] * len(dims))[i] if input_shapes else None
            static = isinstance(d, int) and d > 0
            want_d = d if static else fixed
            if want_d and a.shape[i] != want_d:
                wants = f"the model wants {dims}" if static else f"--input-shape gives {input_shapes[vi.name]}"
                raise OnnxPruneError(f"{p}: array '{vi.name}' has shape {list(a.shape)}, {wants}")
    for name, a in arrays.items():
        if a.dtype.kind in "fc":
            bad = ~np.isfinite(a)
            if bad.any():
                first = int(np.argwhere(bad)[0][0])
                raise OnnxPruneError(f"{p}: array '{name}' holds {int(bad.sum())} NaN or infinite value(s) "
                                     f"(first in sample {first}); clean the data or drop those samples")
    if labels is not None:
        if labels.dtype.kind not in "iu" or labels.ndim != 1 or len(labels) != next(iter(counts)):
            raise OnnxPruneError(f"{p}: 'labels' must be a 1-D int array with one label per sample")
        labels = labels.astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise OnnxPruneError(f"{p}: 'labels' range over [{labels.min()}, {labels.max()}]; class indices "
                                 "start at 0")
    return ArrayData(arrays, labels, kind="npz" if source.endswith(".npz") else "arrays", source=source)


def _npy_header(fh) -> tuple[tuple, bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream ``fh``, which is left at the start of the data."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(fh)


def read_npz(p: Path, budget: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz, reading at most ``budget`` bytes (default: a quarter of the memory available).

    Sizes are taken from each array's header before anything is decompressed: when the arrays would
    take more, only the first samples that fit are read (streamed, so a zip bomb never expands) and a
    note on stderr says how many."""
    if budget is None:
        avail = available_memory()
        budget = max(avail // 4, 2**28) if avail else 2**32
    with zipfile.ZipFile(p) as zf:
        members = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                shape, fortran, dtype = _npy_header(fh)
            if dtype.hasobject:
                raise ValueError("object arrays are not data")
            members[info.filename[:-4]] = (info, shape, fortran, dtype)
        total = sum(int(np.prod(shape, dtype=object)) * dtype.itemsize for _, shape, _, dtype in members.values())
        if total <= budget:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        n = min((shape[0] for _, shape, _, _ in members.values() if shape), default=0)
        per_sample = sum(int(np.prod(shape[1:], dtype=object)) * dtype.itemsize
                         for _, shape, _, dtype in members.values() if shape)
        keep = int(min(n, budget // max(per_sample, 1)))
        if keep < 1 or any(f for _, shape, f, _ in members.values() if len(shape) > 1):
            raise OnnxPruneError(f"{p}: its arrays would take {human_bytes(total)}, more than the "
                                 f"{human_bytes(budget)} onnxprune reads at once; make a smaller file")
        arrays = {}
        for name, (info, shape, _, dtype) in members.items():
            with zf.open(info) as fh:
                _npy_header(fh)
                rows = keep if shape else 1
                count = rows * int(np.prod(shape[1:], dtype=object)) if shape else 1
                buf = fh.read(count * dtype.itemsize)
                if len(buf) != count * dtype.itemsize:
                    raise ValueError("truncated array")
                arrays[name] = np.frombuffer(buf, dtype=dtype).reshape((rows, *shape[1:]) if shape else ()).copy()
    print(f"note: {p}: read the first {keep} of {n} samples ({human_bytes(total)} in all, more than "
          f"the {human_bytes(budget)} read at once)", file=sys.stderr)
    return arrays


def bind_shapes(proto: onnx.ModelProto, data: ArrayData, explicit: dict[str, list[int]] | None = None
                ) -> dict[str, list[int]]:
    """Analysis shapes for ``proto`` fed ``data``: ``explicit`` (``--input-shape``) where given; otherwise
    the model's dims, with each symbolic dim after the first (batch) taken from the data's samples.

    The batch dim stays as the model has it (symbolic: resolved later to 1); static dims were already
    checked against the data when it was opened."""
    explicit = dict(explicit or {})
    out = {}
    for vi in ir.graph_inputs(proto):
        if vi.name in explicit or vi.name not in data.arrays:
            continue
        dims, have = ir.input_dims(vi), tuple(data.arrays[vi.name].shape)
        if not dims or len(have) != len(dims) or all(isinstance(d, int) and d > 0 for d in dims[1:]):
            continue
        first = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1
        out[vi.name] = [first] + [d if isinstance(d, int) and d > 0 else int(h) for d, h in zip(dims[1:], have[1:])]
    return {**out, **explicit}


def fit_empty(value: np.ndarray, declared) -> np.ndarray:
    """An empty input (a KV cache of length 0) at the fixed sizes a model declares (``declared``: its
    dims, ints or names): a pruned model's caches have fewer heads than the data made for the original."""
    if value.size or not declared or len(declared) != value.ndim:
        return value
    return np.zeros([value.shape[0]] + [d if isinstance(d, int) and d > 0 else s
                                        for d, s in zip(declared[1:], value.shape[1:])], dtype=value.dtype)


def random_feed(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], seed: int = 0
                ) -> dict[str, np.ndarray]:
    """One feed with exactly ``input_shapes``: standard normal floats, small non-negative ints."""
    rng = np.random.default_rng(seed)
    return {vi.name: _random_array(rng, vi, list(input_shapes[vi.name])) for vi in ir.graph_inputs(proto)}


def random_data(proto: onnx.ModelProto, input_shapes: dict[str, list[int]], num_samples: int = 8,
                seed: int = 0) -> ArrayData:
    """Synthetic samples: the input shapes with the first (batch) dimension set to ``num_samples``."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for vi in ir.graph_inputs(proto):
        shape = list(input_shapes[vi.name])
        arrays[vi.name] = _random_array(rng, vi, [num_samples] + shape[1:] if shape else [num_samples])
    return ArrayData(arrays, None, kind="random", source="random")


def _random_array(rng: np.random.Generator, vi, full: list[int]) -> np.ndarray:
    dt = ir.input_dtype(vi)
    if dt.kind == "f":
        return rng.standard_normal(full).astype(dt)
    if ir.is_mask_input(vi):   # every position attended, as in a plain prompt
        return np.ones(full, dtype=dt)
    if dt.kind in "iu":
        return rng.integers(0, 2, size=full).astype(dt)
    if dt.kind == "b":
        return rng.integers(0, 2, size=full).astype(bool)
    raise OnnxPruneError(f"input '{vi.name}' has dtype {dt}; random data cannot be made for it")
