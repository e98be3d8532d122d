"""Weight sharing: each large weight tensor becomes a k-means codebook plus small integer indices.

Every eligible Conv/ConvTranspose/Gemm/MatMul weight (the tensors :func:`sparsity.find_sites`
picks: float, at least ``min_size`` elements, not ignored) is clustered, 1-D over its values,
into ``K`` centroids (k-means++ seeding with a fixed seed, Lloyd iterations).  The saved model
stores ``<w>.codebook`` (``[K]``, the weight's dtype) and ``<w>.indices`` (uint8, the weight's
shape) and rebuilds the weight in the graph::

    indices(uint8) -> Cast(to=INT32) -> Gather(codebook, ., axis=0) -> the layer's weight input

ONNX ``Gather`` wants int32/int64 indices, hence the ``Cast``.  With ``K <= 16`` (and an even
element count, opset >= 11) the indices are packed two per byte as ``<w>.packed`` ``[n/2, 1]``
and unpacked with ``BitShift`` (high nibble: shift right 4; low nibble: shift left 4 then
right 4, wrapping in uint8), ``Concat`` and ``Reshape`` before the ``Cast``.  A tensor is
shared only when its codebook and indices are smaller than the dense weight.
onnxruntime constant-folds the decoder at session start, so inference speed is unchanged.
``fold`` writes the dense weights ``codebook[indices]`` back instead (same graph as the input).

JSON report of ``onnxprune share --json`` (stable keys): ``clusters``, ``packed`` (4-bit
packing allowed), ``fold``, ``layers`` [{``name``, ``tensor``, ``op``, ``shape``, ``clusters``
(distinct centroids used), ``bits`` (index bits stored: 4 or 8), ``bytes_before``,
``bytes_after`` (tensor storage), ``weight_error`` (||W - codebook[indices]|| / ||W||)}],
``skipped`` [{``name``, ``tensor``, ``reason``}], ``file_bytes_before``, ``file_bytes_after``,
``compressed_bytes_before``, ``compressed_bytes_after``, ``compression``, ``data`` (what the
fidelity was measured on), ``fidelity`` (see ``onnxprune.measure.quality``), ``accuracy`` and
``reference_accuracy`` (when the data has labels, else null).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..errors import OnnxPruneError
from .sparsity import (MIN_SIZE, find_sites, initializer_arrays, relative_error, set_initializers,
                       weights_as_initializers)

MAX_CLUSTERS = 256
PACK_MAX_CLUSTERS = 16
BITSHIFT_OPSET = 11


@dataclass(frozen=True)
class ShareOptions:
    """What ``share`` does; validated on construction (bad values raise OnnxPruneError)."""

    clusters: int = 16
    min_size: int = MIN_SIZE
    ignore: tuple[str, ...] = ()
    pack: bool = True
    fold: bool = False
    iterations: int = 15
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.clusters, int) or not 2 <= self.clusters <= MAX_CLUSTERS:
            raise OnnxPruneError(f"--clusters {self.clusters}: must be an integer in [2, {MAX_CLUSTERS}] "
                                 "(indices are stored as uint8)")
        if self.min_size < 0 or self.iterations < 1:
            raise OnnxPruneError("--min-size must be >= 0 and iterations >= 1")


# ---------------------------------------------------------------- k-means

def _kmeanspp(pool: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    centers = [pool[rng.integers(len(pool))]]
    d2 = (pool - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        c = pool[rng.integers(len(pool))] if total <= 0 else pool[rng.choice(len(pool), p=d2 / total)]
        centers.append(c)
        d2 = np.minimum(d2, (pool - c) ** 2)
    return np.sort(np.array(centers))


def _assign(values: np.ndarray, sorted_centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre (centres sorted ascending)."""
    return np.searchsorted((sorted_centers[1:] + sorted_centers[:-1]) / 2, values)


def kmeans_1d(values: np.ndarray, k: int, *, iterations: int = 15, seed: int = 0, sample: int = 65536
              ) -> tuple[np.ndarray, np.ndarray]:
    """``(centres [k] float64 sorted, indices uint8 shaped like values)`` minimising squared error.

    Seeding uses at most ``sample`` values; Lloyd iterations use all of them. Empty clusters keep
    their centre; deterministic for a given seed.
    """
    v = np.asarray(values, np.float64).ravel()
    rng = np.random.default_rng(seed)
    pool = v if v.size <= sample else rng.choice(v, sample, replace=False)
    centers = _kmeanspp(pool, k, rng)
    for _ in range(iterations):
        idx = _assign(v, centers)
        counts = np.bincount(idx, minlength=k)
        sums = np.bincount(idx, weights=v, minlength=k)
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), centers))
        if np.array_equal(new, centers):
            break
        centers = new
    return centers, _assign(v, centers).astype(np.uint8).reshape(np.shape(values))


# ---------------------------------------------------------------- per tensor

@dataclass
class Codebook:
    """One shared tensor: ``codebook[indices]`` is the weight."""

    codebook: np.ndarray  # [K], the weight's dtype
    indices: np.ndarray  # uint8, the weight's shape

    def dense(self) -> np.ndarray:
        return self.codebook[self.indices]

    def packable(self) -> bool:
        return len(self.codebook) <= PACK_MAX_CLUSTERS and self.indices.size % 2 == 0

    def packed(self) -> np.ndarray:
        """Two 4-bit indices per byte, high nibble first, as ``[n/2, 1]``."""
        flat = self.indices.reshape(-1, 2)
        return ((flat[:, 0] << 4) | flat[:, 1]).astype(np.uint8).reshape(-1, 1)

    def stored_bytes(self, packed: bool) -> int:
        return self.codebook.nbytes + (self.indices.size // 2 if packed else self.indices.size)


def make_codebook(w: np.ndarray, opts: ShareOptions) -> Codebook:
    centers, idx = kmeans_1d(w, opts.clusters, iterations=opts.iterations, seed=opts.seed)
    return Codebook(centers.astype(w.dtype), idx)


# ---------------------------------------------------------------- graph

def _decoder(tensor: str, cb: Codebook, packed: bool, shift: gs.Constant) -> tuple[list[gs.Node], gs.Variable]:
    """Nodes that rebuild ``tensor`` from its codebook and indices, and the rebuilt tensor."""
    shape = list(cb.indices.shape)
    nodes: list[gs.Node] = []

    def var(suffix, dtype, shp):
        return gs.Variable(f"{tensor}.{suffix}", dtype=dtype, shape=shp)

    if packed:
        p = gs.Constant(f"{tensor}.packed", cb.packed())
        half = [cb.indices.size // 2, 1]
        hi, lo_up, lo = var("hi", np.uint8, half), var("lo_up", np.uint8, half), var("lo", np.uint8, half)
        pairs, idx8 = var("pairs", np.uint8, [half[0], 2]), var("idx_u8", np.uint8, shape)
        nodes += [
            gs.Node("BitShift", f"{tensor}.unpack_hi", {"direction": "RIGHT"}, [p, shift], [hi]),
            gs.Node("BitShift", f"{tensor}.unpack_lo1", {"direction": "LEFT"}, [p, shift], [lo_up]),
            gs.Node("BitShift", f"{tensor}.unpack_lo2", {"direction": "RIGHT"}, [lo_up, shift], [lo]),
            gs.Node("Concat", f"{tensor}.unpack_cat", {"axis": 1}, [hi, lo], [pairs]),
            gs.Node("Reshape", f"{tensor}.unpack_shape", {},
                    [pairs, gs.Constant(f"{tensor}.shape", np.array(shape, np.int64))], [idx8]),
        ]
    else:
        idx8 = gs.Constant(f"{tensor}.indices", cb.indices)
    idx32, out = var("idx", np.int32, shape), var("shared", cb.codebook.dtype, shape)
    nodes += [
        gs.Node("Cast", f"{tensor}.cast", {"to": onnx.TensorProto.INT32}, [idx8], [idx32]),
        gs.Node("Gather", f"{tensor}.gather", {"axis": 0},
                [gs.Constant(f"{tensor}.codebook", cb.codebook), idx32], [out]),
    ]
    return nodes, out


def shared_graph(proto: onnx.ModelProto, books: dict[str, tuple[Codebook, bool]]) -> onnx.ModelProto:
    """``proto`` with each named weight replaced by its decoder (``(codebook, packed)`` per tensor)."""
    graph = ir.to_graph(proto)
    consts = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    shift = gs.Constant("onnxprune.shift4", np.array([4], np.uint8))
    for tensor, (cb, packed) in books.items():
        nodes, out = _decoder(tensor, cb, packed, shift)
        graph.nodes.extend(nodes)
        for node in list(graph.nodes):
            for i, t in enumerate(node.inputs):
                if t is consts[tensor]:
                    node.inputs[i] = out
    return ir.from_graph(graph, proto)


# ---------------------------------------------------------------- driver

@dataclass
class ShareLayer:
    name: str
    tensor: str
    op: str
    shape: list[int]
    clusters: int
    bits: int
    bytes_before: int
    bytes_after: int
    weight_error: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ShareResult:
    proto: onnx.ModelProto
    options: ShareOptions
    layers: list[ShareLayer]
    skipped: list[dict] = field(default_factory=list)
    codebooks: dict[str, Codebook] = field(default_factory=dict)

    def report(self, saved: dict) -> dict:
        """The JSON report (stable keys, see the module docstring). ``saved``: the keys of
        :func:`onnxprune.compress.report.save_and_measure`."""
        o = self.options
        return {"clusters": o.clusters, "packed": o.pack, "fold": o.fold,
                "layers": [lr.as_dict() for lr in self.layers], "skipped": self.skipped, **saved}


def _plan(cb: Codebook, w: np.ndarray, opts: ShareOptions, opset: int) -> tuple[bool, int] | None:
    """``(packed, stored bytes)`` if sharing ``site`` saves bytes, else None."""
    packed = opts.pack and cb.packable() and opset >= BITSHIFT_OPSET
    stored = cb.stored_bytes(packed) + 64 * (5 if packed else 2)  # rough proto overhead of the decoder
    return (packed, stored) if stored < w.nbytes else None


def share(proto: onnx.ModelProto, opts: ShareOptions, progress=None) -> ShareResult:
    """Cluster every eligible weight of ``proto``; the input is not modified."""
    proto = weights_as_initializers(proto)
    sites, skipped = find_sites(proto, min_size=opts.min_size, ignore=opts.ignore)
    arrays = initializer_arrays(proto, [s.tensor for s in sites])
    opset = ir.Model(proto).opset
    books: dict[str, tuple[Codebook, bool]] = {}
    layers: list[ShareLayer] = []
    it = sites if progress is None else progress(sites, len(sites), "clustering")
    for s in it:
        w = arrays[s.tensor]
        cb = make_codebook(w, opts)
        plan = _plan(cb, w, opts, opset)
        if plan is None:
            skipped.append({"name": s.name, "tensor": s.tensor, "reason": "codebook + indices not smaller"})
            continue
        books[s.tensor] = (cb, plan[0])
        err = relative_error(cb.dense(), w)
        layers.append(ShareLayer(s.name, s.tensor, s.op, list(w.shape), int(len(np.unique(cb.indices))),
                                 4 if plan[0] else 8, int(w.nbytes), int(cb.stored_bytes(plan[0])), err))
    if not books:
        raise OnnxPruneError("no weight was shared (all too small, ignored or not float); lower --min-size")
    if opts.fold:
        out = set_initializers(proto, {t: cb.dense() for t, (cb, _) in books.items()})
    else:
        out = shared_graph(proto, books)
    return ShareResult(out, opts, layers, skipped, {t: cb for t, (cb, _) in books.items()})

