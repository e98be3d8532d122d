"""Unstructured and N:M sparsity: zero individual weights of Conv/ConvTranspose/Gemm/MatMul.

Every weight is seen through a :class:`Layout`, a ``[groups, rows, cols]`` matrix view in
which a row is one output and the columns are the inputs it sums over, so one set of
criteria serves every op:

* ``magnitude`` -- smallest ``|W|`` per layer (or across layers with ``global_scope``);
* ``wanda`` -- smallest ``|W| * ||X_col||`` per output row (Sun et al. 2023), column norms
  from calibration data;
* ``sparsegpt`` -- OBS mask selection and blocked column-by-column compensation of the kept
  weights with ``H = X^T X + damp * mean(diag H) * I`` (Frantar & Alistarh 2023).

Column order.  Conv ``W[O, I/g, *k]`` is viewed as ``[g, O/g, k..., I/g]`` -- input channels
innermost, as NVIDIA's 2:4 sparsity is defined for convolutions -- so an N:M block is M
consecutive input channels at one kernel position of one output channel; layers whose
``I/g`` is not a multiple of M are skipped for N:M.  ConvTranspose ``W[I, O/g, *k]`` rows are
(output channel, kernel position), columns its group's input channels (its calibration
statistics treat each kernel tap as a 1x1 conv: exact when stride >= kernel).  Gemm rows are
the outputs and columns K (``transB`` respected); MatMul ``W[K, N]`` the same, along K.
``N:M`` keeps N of every M (2:4 = 50%).

Counts.  Per-layer criteria zero exactly ``floor(s*n + 1/2)`` weights of an ``n``-weight
layer (row and column-block quotas are rounded cumulatively so they add up to it); global
magnitude zeros exactly ``floor(s*N + 1/2)`` of all ``N`` eligible weights; N:M zeros M-N
in every block.

Scope.  Only float initializers at the weight input (index 1) of those ops, never biases or
norms; tensors under ``min_size`` elements (128) and ``ignore``-d node or tensor names are
skipped; the final classifier is included by default.  A tensor read by several layers gets
one mask, chosen by magnitude (calibration criteria fall back, and the layer's ``note`` says
so).  With ``sequential`` (default) calibration runs in waves: a layer's statistics come
from the model with every weight layer upstream of it already sparsified.

JSON report of ``onnxprune sparsify --json`` (stable keys): ``sparsity`` (target),
``pattern`` ("N:M" or null), ``criterion``, ``global``, ``achieved_sparsity`` (zeros / weights
over the sparsified tensors), ``layers`` [{``name`` (first consumer node), ``tensor``, ``op``,
``shape``, ``sparsity`` (zero fraction after), ``pruned``, ``criterion``, ``weight_error``
(||dW||/||W||), ``output_error`` (||X dW^T|| / ||X W^T|| on calibration data, sparsegpt
only, else null), ``note``}], ``skipped`` [{``name``, ``tensor``, ``reason``}],
``file_bytes_before``, ``file_bytes_after``, ``compressed_bytes_before``,
``compressed_bytes_after``, ``compression`` ("zstd" or "gzip"), ``calibration`` (data kind
or null), ``fidelity`` (output comparison with the original, see ``onnxprune.validate``).
"""

from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from . import calibrate, ir
from .data import ArrayData
from .errors import OnnxPruneError

CRITERIA = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
MIN_SIZE = 128


# ---------------------------------------------------------------- targets

@dataclass(frozen=True)
class Pattern:
    """Semi-structured sparsity: keep ``n`` of every ``m`` consecutive inputs."""

    n: int
    m: int

    @classmethod
    def parse(cls, spec: str) -> "Pattern":
        mt = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec or "")
        if not mt:
            raise OnnxPruneError(f"--pattern '{spec}': expected N:M, e.g. 2:4 (keep N of every M weights)")
        n, m = int(mt.group(1)), int(mt.group(2))
        if not 0 < n < m:
            raise OnnxPruneError(f"--pattern {spec}: need 0 < N < M (N weights kept of every M), e.g. 2:4")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Options:
    """What ``sparsify`` does; validated on construction (bad values raise OnnxPruneError)."""

    sparsity: float | None = None
    pattern: Pattern | None = None
    criterion: str = "magnitude"
    global_scope: bool = False
    ignore: tuple[str, ...] = ()
    min_size: int = MIN_SIZE
    sequential: bool = True
    blocksize: int = 128
    damp: float = 0.01
    calib_samples: int = 128
    batch_size: int = 16

    def __post_init__(self):
        s, p = self.sparsity, self.pattern
        if s is None and p is None:
            raise OnnxPruneError("give --sparsity (e.g. 0.7) or --pattern (e.g. 2:4)")
        if s is not None and (not isinstance(s, (int, float)) or math.isnan(s) or not 0 <= s < 1):
            raise OnnxPruneError(f"--sparsity {s}: must be in [0, 1)")
        if p is not None and s is not None and abs(s - p.sparsity) > 1e-9:
            raise OnnxPruneError(f"--sparsity {s} contradicts --pattern {p} ({p.sparsity:g}); give one of them")
        if self.criterion not in CRITERIA:
            raise OnnxPruneError(f"--criterion {self.criterion}: expected one of {', '.join(CRITERIA)}")
        if self.global_scope and (p is not None or self.criterion != "magnitude"):
            raise OnnxPruneError("--global works with --criterion magnitude and no --pattern only")
        if self.min_size < 0 or self.blocksize < 1 or self.calib_samples < 1 or self.batch_size < 1:
            raise OnnxPruneError("--min-size must be >= 0; block size, calibration samples and batch size >= 1")
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise OnnxPruneError(f"--damp {self.damp}: must be a positive number, e.g. 0.01")

    @property
    def target(self) -> float:
        return self.pattern.sparsity if self.sparsity is None else float(self.sparsity)

    @property
    def calibrated(self) -> bool:
        return self.criterion in CALIBRATED


# ---------------------------------------------------------------- layouts and sites

@dataclass(frozen=True)
class Layout:
    """A weight as ``[groups, rows, cols]``: reshape to ``pre``, transpose by ``perm``, reshape to ``mat``."""

    shape: tuple[int, ...]
    pre: tuple[int, ...]
    perm: tuple[int, ...]
    mat: tuple[int, int, int]
    block_len: int  # length of the innermost input axis (where N:M blocks live)

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.reshape(self.pre).transpose(self.perm).reshape(self.mat)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        mid = tuple(self.pre[i] for i in self.perm)
        return m.reshape(mid).transpose(np.argsort(self.perm)).reshape(self.shape)


def _conv_layout(shape, attrs) -> Layout:
    o, i, k = shape[0], shape[1], shape[2:]
    g = attrs["group"]
    nd = len(k)
    return Layout(tuple(shape), (g, o // g, i, *k), (0, 1, *range(3, 3 + nd), 2),
                  (g, o // g, int(np.prod(k)) * i), i)


def _conv_transpose_layout(shape, attrs) -> Layout:
    cin, o, k = shape[0], shape[1], shape[2:]
    g = attrs["group"]
    nd = len(k)
    return Layout(tuple(shape), (g, cin // g, o, *k), (0, 2, *range(3, 3 + nd), 1),
                  (g, o * int(np.prod(k)), cin // g), cin // g)


def _gemm_layout(shape, attrs) -> Layout:
    if attrs.get("transB", 0):
        n, k = shape
        return Layout(tuple(shape), (1, n, k), (0, 1, 2), (1, n, k), k)
    k, n = shape
    return Layout(tuple(shape), (1, k, n), (0, 2, 1), (1, n, k), k)


def _conv_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    a = site.attrs
    p = calibrate.conv_patches(x, a["kernel_shape"], a["strides"], a["pads"], a["dilations"], a["group"],
                               a["auto_pad"])
    g, s, _ = p.shape
    i, kk = site.layout.block_len, int(np.prod(a["kernel_shape"]))
    return p.reshape(g, s, i, kk).transpose(0, 1, 3, 2).reshape(g, s, kk * i)


def _conv_transpose_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    g = site.layout.mat[0]
    cols = np.moveaxis(x, 1, -1).reshape(-1, g, site.layout.block_len)
    return cols.transpose(1, 0, 2)


def _gemm_samples(x: np.ndarray, site: "Site") -> np.ndarray:
    if site.attrs.get("transA", 0):
        x = x.T
    return x.reshape(1, -1, site.layout.block_len)


def _node_attrs(node: onnx.NodeProto, shape) -> dict:
    if node.op_type in ("Conv", "ConvTranspose"):
        return calibrate.conv_attrs(node, shape)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


# op -> (weight rank check, layout, calibration samples [G, S, cols] from the op's input 0)
OP_RULES: dict[str, tuple[Callable[[Sequence[int]], bool], Callable, Callable]] = {
    "Conv": (lambda s: len(s) >= 3, _conv_layout, _conv_samples),
    "ConvTranspose": (lambda s: len(s) >= 3, _conv_transpose_layout, _conv_transpose_samples),
    "Gemm": (lambda s: len(s) == 2, _gemm_layout, _gemm_samples),
    "MatMul": (lambda s: len(s) == 2, _gemm_layout, _gemm_samples),
}


@dataclass
class Site:
    """One weight tensor and the layer(s) that read it."""

    tensor: str
    name: str  # first consumer node
    op: str
    layout: Layout
    attrs: dict
    input: str  # activation fed to the first consumer
    consumers: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return int(np.prod(self.layout.shape))

    def samples(self, x: np.ndarray) -> np.ndarray:
        return OP_RULES[self.op][2](x, self)


def node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def find_sites(proto: onnx.ModelProto, *, min_size: int = MIN_SIZE, ignore: Iterable[str] = ()
               ) -> tuple[list[Site], list[dict]]:
    """Weight tensors eligible for sparsity or sharing, and the skipped ones with a reason."""
    inits = {t.name: t for t in proto.graph.initializer}
    ignore = set(ignore)
    sites: dict[str, Site] = {}
    skipped: list[dict] = []
    for idx, node in enumerate(proto.graph.node):
        if node.op_type not in OP_RULES or len(node.input) < 2 or node.input[1] not in inits:
            continue
        name, tname = node_label(node, idx), node.input[1]
        if tname in sites:
            if sites[tname] is not None:
                sites[tname].consumers.append(name)
            continue
        t = inits[tname]
        shape = list(t.dims)
        rank_ok, make_layout, _ = OP_RULES[node.op_type]
        reason = None
        if name in ignore or tname in ignore:
            reason = "ignored"
        elif t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            reason = "not a float tensor"
        elif not rank_ok(shape):
            reason = f"{node.op_type} weight of rank {len(shape)} not supported"
        elif int(np.prod(shape)) < min_size:
            reason = f"{int(np.prod(shape))} weights < min size {min_size}"
        if reason:
            skipped.append({"name": name, "tensor": tname, "reason": reason})
            sites[tname] = None  # type: ignore[assignment]  # seen; later consumers ignored too
            continue
        attrs = _node_attrs(node, shape)
        sites[tname] = Site(tname, name, node.op_type, make_layout(shape, attrs), attrs, node.input[0], [name])
    return [s for s in sites.values() if s is not None], skipped


def weights_as_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with ``Constant`` nodes lifted to initializers (unchanged if it has none)."""
    if not any(n.op_type == "Constant" for n in proto.graph.node):
        return proto
    return ir.from_graph(ir.to_graph(proto), proto)


def set_initializers(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose named initializers hold new values (same names, dtypes, shapes)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(np.asarray(arrays[t.name]).astype(ir.np_dtype(t.data_type)), t.name))
    return out


def initializer_arrays(proto: onnx.ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    names = set(names)
    return {t.name: ir.tensor_to_array(t) for t in proto.graph.initializer if t.name in names}


# ---------------------------------------------------------------- mask selection

def _quota(s: float, units: int) -> int:
    return int(math.floor(s * units + 0.5))


def lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly the ``k`` lowest scores."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, bool)
    if k >= flat.size:
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    return mask.reshape(scores.shape)


def _lowest_along_last(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per slice along the last axis, the ``counts[...]`` lowest entries."""
    order = np.argsort(scores, axis=-1)
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, np.arange(scores.shape[-1]) < counts[..., None], axis=-1)
    return mask


def lowest_per_row(scores: np.ndarray, s: float) -> np.ndarray:
    """Per row of the last axis, the lowest ``s`` fraction, quotas rounded cumulatively."""
    rows = scores.reshape(-1, scores.shape[-1])
    r, c = rows.shape
    cum = np.array([_quota(s, c * i) for i in range(r + 1)])
    return _lowest_along_last(rows, np.diff(cum)).reshape(scores.shape)


def lowest_nm(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """In every block of ``m`` along the last axis, the ``m - n`` lowest."""
    blocks = scores.reshape(*scores.shape[:-1], -1, pattern.m)
    return _lowest_along_last(blocks, np.full(blocks.shape[:-1], pattern.m - pattern.n)).reshape(scores.shape)


def select(scores: np.ndarray, opts: Options, per_row: bool) -> np.ndarray:
    if opts.pattern is not None:
        return lowest_nm(scores, opts.pattern)
    if per_row:
        return lowest_per_row(scores, opts.target)
    return lowest(scores, _quota(opts.target, scores.size))


# ---------------------------------------------------------------- criteria

@dataclass
class Stats:
    """Calibration statistics of one site: column sums of squares or the full Gram matrix."""

    full: bool
    count: int = 0
    value: np.ndarray | None = None  # [G, C] or [G, C, C]

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        v = np.einsum("gsc,gsc->gc", x, x) if not self.full else np.matmul(x.transpose(0, 2, 1), x)
        v = v.astype(np.float64)
        self.value = v if self.value is None else self.value + v
        self.count += x.shape[1]


def magnitude(w: np.ndarray, stats: Stats | None, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    mask = select(np.abs(w), opts, per_row=False)
    return np.where(mask, 0.0, w), mask


def wanda(w: np.ndarray, stats: Stats, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    mask = select(np.abs(w) * np.sqrt(stats.value)[:, None, :], opts, per_row=True)
    return np.where(mask, 0.0, w), mask


def _inv_upper(r: np.ndarray) -> np.ndarray:
    """Inverse of an upper-triangular matrix by 2x2 blocks (matrix products only, ~n^3/3 flops)."""
    n = len(r)
    if n <= 256:
        return np.linalg.inv(r)
    k = n // 2
    a, d = _inv_upper(r[:k, :k]), _inv_upper(r[k:, k:])
    out = np.zeros_like(r)
    out[:k, :k], out[k:, k:] = a, d
    out[:k, k:] = -(a @ r[:k, k:]) @ d
    return out


def _inverse_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper-triangular ``U`` with ``U^T U = (H + damp*mean(diag H)*I)^-1``.

    With ``P`` the reversal permutation, ``P H P = L L^T`` gives ``H = R R^T`` for the upper
    ``R = P L P``, so ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1``: one Cholesky, one triangular inverse.
    """
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    eye = np.eye(len(h))
    for attempt in range(6):
        try:
            low = np.linalg.cholesky((h + damp * (10 ** attempt) * mean * eye)[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        return _inv_upper(np.ascontiguousarray(low[::-1, ::-1]))
    raise np.linalg.LinAlgError("Hessian not positive definite even with 1e5x damping")


def sparsegpt_group(w: np.ndarray, h: np.ndarray, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    """One ``[rows, cols]`` matrix: blocked OBS pruning with compensation of the kept weights."""
    w = w.astype(np.float64, copy=True)
    r, c = w.shape
    u = _inverse_upper(h, opts.damp)
    pat, s = opts.pattern, opts.target
    bs = opts.blocksize if pat is None else max(pat.m, opts.blocksize // pat.m * pat.m)
    mask = np.zeros_like(w, bool)
    for b0 in range(0, c, bs):
        b1 = min(b0 + bs, c)
        w1, u1 = w[:, b0:b1].copy(), u[b0:b1, b0:b1]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        m1 = lowest(w1 ** 2 / d ** 2, _quota(s, r * b1) - _quota(s, r * b0)) if pat is None else \
            np.zeros_like(w1, bool)
        for i in range(b1 - b0):
            if pat is not None and i % pat.m == 0:
                m1[:, i:i + pat.m] = lowest_nm(w1[:, i:i + pat.m] ** 2 / d[i:i + pat.m] ** 2, pat)
            col = w1[:, i]
            e = np.where(m1[:, i], col, 0.0) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w1[m1] = 0.0
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]
        mask[:, b0:b1] = m1
    return w, mask


def sparsegpt(w: np.ndarray, stats: Stats, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    h = stats.value / max(stats.count, 1)
    parts = [sparsegpt_group(w[g], h[g], opts) for g in range(w.shape[0])]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


# criterion -> (function over [G, R, C] weights, statistics it needs: None, column norms, full Gram)
CRITERION_RULES: dict[str, tuple[Callable, bool | None]] = {
    "magnitude": (magnitude, None),
    "wanda": (wanda, False),
    "sparsegpt": (sparsegpt, True),
}


def relative_error(new: np.ndarray, old: np.ndarray) -> float:
    """``||new - old|| / ||old||`` in float64 (0 for an all-zero ``old``)."""
    old = np.asarray(old, np.float64)
    norm = float(np.linalg.norm(old))
    return float(np.linalg.norm(np.asarray(new, np.float64) - old) / norm) if norm else 0.0


def output_error(w: np.ndarray, new: np.ndarray, stats: Stats | None) -> float | None:
    """``||X dW^T|| / ||X W^T||`` from the Gram matrix (None without one)."""
    if stats is None or not stats.full:
        return None
    d = new - w
    num = float(np.sum(np.matmul(d, stats.value) * d))
    den = float(np.sum(np.matmul(w, stats.value) * w))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0


# ---------------------------------------------------------------- driver

@dataclass
class LayerResult:
    name: str
    tensor: str
    op: str
    shape: list[int]
    numel: int
    pruned: int
    sparsity: float
    criterion: str
    weight_error: float
    output_error: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Result:
    proto: onnx.ModelProto
    options: Options
    layers: list[LayerResult]
    skipped: list[dict]
    passes: int = 0

    @property
    def achieved_sparsity(self) -> float:
        n = sum(lr.numel for lr in self.layers)
        return sum(lr.sparsity * lr.numel for lr in self.layers) / n if n else 0.0


def waves(proto: onnx.ModelProto, sites: list[Site]) -> list[list[Site]]:
    """Sites grouped so that every site's upstream weight layers are in earlier waves."""
    producer: dict[str, tuple[str, list[str]]] = {}
    for i, n in enumerate(proto.graph.node):
        for o in n.output:
            producer[o] = (node_label(n, i), list(n.input))
    owner = {c: s.tensor for s in sites for c in s.consumers}
    memo: dict[str, frozenset] = {}

    def upstream(tensor: str) -> frozenset:
        stack, seen, found = [tensor], set(), set()
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue
            seen.add(t)
            if t in memo:
                found |= memo[t]
                continue
            label, inputs = producer[t]
            if label in owner:
                found.add(owner[label])
            stack.extend(inputs)
        memo[tensor] = frozenset(found)
        return memo[tensor]

    deps = {s.tensor: upstream(s.input) - {s.tensor} for s in sites}
    done: set[str] = set()
    out: list[list[Site]] = []
    left = list(sites)
    while left:
        wave = [s for s in left if deps[s.tensor] <= done] or left[:1]
        out.append(wave)
        done |= {s.tensor for s in wave}
        left = [s for s in left if s.tensor not in done]
    return out


def collect_stats(proto: onnx.ModelProto, sites: list[Site], full: bool, data: ArrayData, opts: Options,
                  progress=None) -> dict[str, Stats]:
    """Stream calibration batches through ``proto`` and accumulate each site's statistics.

    Only the part of the model upstream of the tapped tensors runs; layers fed by a graph input
    need no run at all.
    """
    stats = {s.tensor: Stats(full) for s in sites}

    def visit(tapped, feed):
        for s in sites:
            x = tapped[s.input] if s.input in tapped else feed[s.input]
            stats[s.tensor].add(s.samples(np.asarray(x, np.float32)))

    inputs = {i.name for i in proto.graph.input}
    tensors = list(dict.fromkeys(s.input for s in sites if s.input not in inputs))
    fixed = fixed_batch(proto)
    limit = min(opts.calib_samples, data.num_samples)
    if fixed:
        limit = limit // fixed * fixed
        if not limit:
            raise OnnxPruneError(f"the model takes batches of exactly {fixed}; give at least {fixed} "
                                 "calibration samples")
    batch = fixed or opts.batch_size
    if tensors:
        calibrate.tap(upstream_model(proto, tensors), tensors, data, visit, batch_size=batch, limit=limit,
                      progress=progress, description="calibrating")
    else:
        for feed in data.batches(batch, limit):
            visit({}, feed)
    return stats


def upstream_model(proto: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """The nodes and initializers of ``proto`` that ``tensors`` depend on, with no graph outputs
    (a calibration run adds ``tensors`` as outputs); ``proto`` itself if it has subgraphs."""
    nodes = proto.graph.node
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return proto
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(nodes[i].input)
    used = {t for i in keep for t in nodes[i].input}
    sub = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(sub, f, getattr(proto, f))
    sub.opset_import.extend(proto.opset_import)
    sub.functions.extend(proto.functions)
    g = sub.graph
    g.name = proto.graph.name
    inits = {t.name for t in proto.graph.initializer}
    g.input.extend(i for i in proto.graph.input if i.name not in inits or i.name in used)
    g.node.extend(nodes[i] for i in sorted(keep))
    g.initializer.extend(t for t in proto.graph.initializer if t.name in used)
    g.value_info.extend(proto.graph.value_info)
    return sub


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size a model's inputs fix (e.g. 1 for many exports), or None if it is free."""
    firsts = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) and first > 0 else None


def _global_masks(proto: onnx.ModelProto, sites: list[Site], opts: Options) -> dict[str, np.ndarray]:
    arrays = initializer_arrays(proto, [s.tensor for s in sites])
    flat = np.concatenate([np.abs(arrays[s.tensor].astype(np.float64)).ravel() for s in sites])
    mask = lowest(flat, _quota(opts.target, flat.size))
    out, at = {}, 0
    for s in sites:
        out[s.tensor] = mask[at:at + s.numel].reshape(s.layout.shape)
        at += s.numel
    return out


def _prune_site(site: Site, w: np.ndarray, opts: Options, stats: Stats | None, global_mask=None
                ) -> tuple[np.ndarray, LayerResult]:
    criterion, note = opts.criterion, ""
    if opts.calibrated and len(site.consumers) > 1:
        criterion, stats = "magnitude", None
        note = f"shared by {len(site.consumers)} layers: one magnitude mask"
    wm = site.layout.to_matrix(w.astype(np.float64))
    if global_mask is not None:
        mask = site.layout.to_matrix(global_mask)
        new = np.where(mask, 0.0, wm)
    else:
        new, mask = CRITERION_RULES[criterion][0](wm, stats, opts)
    dense = site.layout.from_matrix(new).astype(w.dtype)
    res = LayerResult(site.name, site.tensor, site.op, list(site.layout.shape), site.numel, int(mask.sum()),
                      float(np.mean(dense == 0)), criterion, relative_error(new, wm), output_error(wm, new, stats),
                      note)
    return dense, res


def _nm_eligible(sites: list[Site], skipped: list[dict], opts: Options) -> list[Site]:
    if opts.pattern is None:
        return sites
    keep = []
    for s in sites:
        if s.layout.block_len % opts.pattern.m:
            skipped.append({"name": s.name, "tensor": s.tensor,
                            "reason": f"input length {s.layout.block_len} not a multiple of {opts.pattern.m}"})
        else:
            keep.append(s)
    return keep


def require_calibration(opts: Options, has_data: bool) -> None:
    if opts.calibrated and not has_data:
        raise OnnxPruneError(f"--criterion {opts.criterion} needs calibration data: pass --calib DATA.npz "
                             "(or --calib random)")


def sparsify(proto: onnx.ModelProto, opts: Options, data: ArrayData | None = None, progress=None) -> Result:
    """Zero weights of every eligible layer of ``proto`` as ``opts`` says; the input is not modified."""
    require_calibration(opts, data is not None)
    proto = weights_as_initializers(proto)
    sites, skipped = find_sites(proto, min_size=opts.min_size, ignore=opts.ignore)
    sites = _nm_eligible(sites, skipped, opts)
    if not sites:
        raise OnnxPruneError("no Conv/Gemm/MatMul weight is eligible (all skipped: too small, ignored or "
                             "not float); lower --min-size or check --ignore")
    full = CRITERION_RULES[opts.criterion][1]
    gmasks = _global_masks(proto, sites, opts) if opts.global_scope else {}
    plan = waves(proto, sites) if opts.calibrated and opts.sequential else [sites]
    results: dict[str, LayerResult] = {}
    passes = 0
    for wave in plan:
        stats = {}
        if full is not None and any(len(s.consumers) == 1 for s in wave):
            stats = collect_stats(proto, [s for s in wave if len(s.consumers) == 1], full, data, opts, progress)
            passes += 1
        arrays = initializer_arrays(proto, [s.tensor for s in wave])
        new = {}
        for s in wave:
            new[s.tensor], results[s.tensor] = _prune_site(s, arrays[s.tensor], opts, stats.get(s.tensor),
                                                           gmasks.get(s.tensor))
        proto = set_initializers(proto, new)
    layers = [results[s.tensor] for s in sites]
    return Result(proto, opts, layers, skipped, passes)


# ---------------------------------------------------------------- storage

def compression_method() -> str:
    """``"zstd"`` when the optional ``zstandard`` package is importable, else ``"gzip"``."""
    try:
        import zstandard  # noqa: F401
        return "zstd"
    except ImportError:
        return "gzip"


def model_files(path: str | os.PathLike) -> list[Path]:
    """A saved model file and the external data files it references."""
    p = Path(path)
    files = [p]
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            f = p.parent / e.value
            if e.key == "location" and f not in files and f.exists():
                files.append(f)
    return files


def compressed_size(path: str | os.PathLike, method: str | None = None) -> int:
    """Bytes of the model file (plus external data) after zstd (level 10) or gzip (level 9)."""
    method = method or compression_method()
    if method == "zstd":
        import zstandard
        comp = zstandard.ZstdCompressor(level=10).compressobj()
    elif method == "gzip":
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    else:
        raise ValueError(method)
    total = 0
    for f in model_files(path):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(comp.compress(chunk))
    return total + len(comp.flush())
