"""Calibration statistics for the importance criteria, gathered in one streaming pass.

What a criterion needs is declared as :class:`Needs`: per-position moments of
some tensors along their channel axis, per-sample histograms for entropy, and
Gram matrices ``XᵀX`` of consumer-layer inputs (the im2col Gram for Conv, per
conv group). :func:`collect` streams the data once through ``taps.tap``
and accumulates everything; memory is bounded by the batch size and by the
size of the statistics themselves, never by the number of samples.

Statistics are kept per *position* of the channel axis, not per group channel:
the members' ``index`` arrays map positions to channels afterwards, so one
tensor's statistics serve every group that touches it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .. import ir
from ..runtime import taps
from ..data import DataSource
from ..errors import OnnxPruneError

DEFAULT_BINS = 32                 # entropy histogram bins over each channel's own range
HIST_OVERSAMPLE = 16              # the streaming histogram keeps this many times finer bins
_GRAM_CHUNK_BYTES = 64 << 20      # float64 bytes of im2col rows handled at once
GRAM_ROWS = 256                   # rows per sample in a Gram matrix (None: all)
MAX_OUTPUTS = 64                  # tapped tensors per onnxruntime session (more -> more passes)


@dataclass(frozen=True)
class GramSpec:
    """How to form the rows whose Gram matrix a consumer layer needs."""

    x: str                        # the layer's data input
    x_axis: int                   # channel axis of x
    conv: tuple | None = None     # sorted (key, value) Conv attributes; None for a dense layer

    @property
    def conv_attrs(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (self.conv or ())}


@dataclass
class Needs:
    """Statistics some criteria want: tensor -> channel axis, and Gram key -> spec."""

    moments: set[tuple[str, int]] = field(default_factory=set)
    hist: set[tuple[str, int]] = field(default_factory=set)
    grams: dict[str, GramSpec] = field(default_factory=dict)

    def merge(self, other: "Needs") -> "Needs":
        self.moments |= other.moments
        self.hist |= other.hist
        self.grams.update(other.grams)
        return self

    def missing(self, have: "CalibrationStats | None") -> "Needs":
        if have is None:
            return Needs(set(self.moments), set(self.hist), dict(self.grams))
        return Needs({k for k in self.moments if k not in have.tensors},
                     {k for k in self.hist if k not in have.tensors or have.tensors[k].hist is None},
                     {k: v for k, v in self.grams.items() if k not in have.grams})

    def __bool__(self) -> bool:
        return bool(self.moments or self.hist or self.grams)


@dataclass
class TensorStats:
    """Running sums per position of one tensor's channel axis."""

    axis: int
    count: np.ndarray             # elements seen per position
    abs_sum: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    nonpos: np.ndarray            # elements <= 0 per position
    samples: int = 0
    hist: np.ndarray | None = None    # [P, bins * HIST_OVERSAMPLE] fine counts of per-sample channel means
    lo: np.ndarray | None = None      # fine histogram start and bin width per position
    width: np.ndarray | None = None
    low: np.ndarray | None = None     # exact range of the per-sample means per position
    high: np.ndarray | None = None
    bins: int = DEFAULT_BINS          # bins of :meth:`histogram` (and of the entropy)

    @classmethod
    def empty(cls, axis: int, positions: int) -> "TensorStats":
        z = lambda: np.zeros(positions, dtype=np.float64)  # noqa: E731
        return cls(axis, z(), z(), z(), z(), z())

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / np.maximum(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1)

    @property
    def var(self) -> np.ndarray:
        return np.maximum(self.sumsq / np.maximum(self.count, 1) - self.mean ** 2, 0.0)

    @property
    def nonpos_fraction(self) -> np.ndarray:
        return self.nonpos / np.maximum(self.count, 1)

    def histogram(self) -> np.ndarray:
        """[P, bins] counts of the per-sample means on ``bins`` equal bins over each position's own
        [min, max], from the fine streaming histogram (mass spread uniformly inside a fine bin)."""
        if self.hist is None:
            raise ValueError("histogram was not collected")
        fine = self.hist.shape[1]
        span = self.high - self.low
        edges = self.low[:, None] + span[:, None] * np.linspace(0.0, 1.0, self.bins + 1)[None, :]
        k = np.clip(np.floor((edges - self.lo[:, None]) / self.width[:, None]), 0, fine - 1).astype(np.int64)
        # extent of fine bin k clipped to the data range, and how far into it each edge is
        a = np.maximum(self.lo[:, None] + self.width[:, None] * k, self.low[:, None])
        b = np.minimum(self.lo[:, None] + self.width[:, None] * (k + 1), self.high[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(b > a, np.clip((edges - a) / (b - a), 0.0, 1.0), 1.0)
        cum = np.concatenate([np.zeros((len(self.hist), 1)), np.cumsum(self.hist, axis=1)], axis=1)
        rows = np.arange(len(self.hist))[:, None]
        cdf = cum[rows, k] + frac * self.hist[rows, k]
        cdf[:, 0] = 0.0
        cdf[:, -1] = cum[:, -1]
        out = np.diff(cdf, axis=1)
        out[span <= 0] = 0.0
        out[span <= 0, 0] = cum[span <= 0, -1]                    # a constant channel: one bin
        return out

    def entropy(self) -> np.ndarray:
        """Shannon entropy (nats) of each position's :meth:`histogram` of per-sample means."""
        h = self.histogram()
        p = h / np.maximum(h.sum(axis=1, keepdims=True), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)

    def add(self, x: np.ndarray, bins: int | None) -> None:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        # [before, positions, after]: the inner reduction is contiguous, partial sums are float64
        x3 = x.reshape(int(np.prod(x.shape[:self.axis])), x.shape[self.axis], -1)
        self.count += x.size // x.shape[self.axis]
        self.abs_sum += np.abs(x3).sum(axis=2, dtype=np.float64).sum(axis=0)
        self.sum += x3.sum(axis=2, dtype=np.float64).sum(axis=0)
        self.sumsq += np.einsum("apb,apb->ap", x3, x3, dtype=np.float64).sum(axis=0)
        self.nonpos += np.count_nonzero(x3 <= 0, axis=(0, 2))
        if bins:
            self.bins = bins
            self._add_hist(x.astype(np.float64, copy=False), bins * HIST_OVERSAMPLE)
        self.samples += x.shape[0] if self.axis != 0 and x.ndim > 1 else 1

    def _add_hist(self, x: np.ndarray, bins: int) -> None:
        """Fine streaming histogram: ``bins`` (even) bins per position whose width doubles whenever a
        sample falls outside the range (adjacent bins merge), so no pass is needed to find the range;
        the exact range is kept beside it for :meth:`histogram`."""
        means = np.nan_to_num(_sample_means(x, self.axis))          # [N, P]
        lo_b, hi_b = means.min(axis=0), means.max(axis=0)
        self.low = lo_b if self.low is None else np.minimum(self.low, lo_b)
        self.high = hi_b if self.high is None else np.maximum(self.high, hi_b)
        if self.hist is None:
            span = hi_b - lo_b
            self.lo = lo_b.copy()
            self.width = np.where(span > 0, span, 1e-12 + 1e-9 * np.abs(lo_b)) / (bins - 1)
            self.hist = np.zeros((means.shape[1], bins), dtype=np.float64)
        while True:
            down = lo_b < self.lo
            up = ~down & (hi_b >= self.lo + self.width * bins)
            if not (down.any() or up.any()):
                break
            for sel, half in ((up, slice(0, bins // 2)), (down, slice(bins // 2, bins))):
                if sel.any():
                    merged = self.hist[sel, 0::2] + self.hist[sel, 1::2]
                    self.hist[sel] = 0.0
                    self.hist[np.ix_(np.nonzero(sel)[0], np.arange(bins)[half])] = merged
            self.lo = np.where(down, self.lo - self.width * bins, self.lo)
            self.width = np.where(up | down, 2 * self.width, self.width)
        b = np.clip(np.floor((means - self.lo) / self.width), 0, bins - 1).astype(np.int64)
        flat = (np.arange(means.shape[1]) * bins)[None, :] + b
        self.hist += np.bincount(flat.ravel(), minlength=self.hist.size).reshape(self.hist.shape)


def _sample_means(x: np.ndarray, axis: int) -> np.ndarray:
    """[N, P]: each sample's mean per position of ``axis`` (batch is axis 0 unless axis is 0)."""
    if x.ndim == 1 or axis == 0:
        return np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    other = tuple(i for i in range(1, x.ndim) if i != axis)
    m = x.mean(axis=other) if other else x
    return m if axis >= 1 else m.T


@dataclass
class GramStats:
    gram: np.ndarray              # [conv groups, D, D], float64
    rows: int = 0
    sums: np.ndarray | None = None    # [conv groups, D]: column sums (means for an intercept)


@dataclass
class CalibrationStats:
    """Everything the calibration criteria read; ``source`` is the data kind ("random" is reported)."""

    source: str = ""
    samples: int = 0
    tensors: dict[tuple[str, int], TensorStats] = field(default_factory=dict)
    grams: dict[str, GramStats] = field(default_factory=dict)
    passes: int = 0               # how many times the data was streamed

    def tensor(self, name: str, axis: int) -> TensorStats:
        return self.tensors[(name, axis)]

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        self.tensors.update(other.tensors)
        self.grams.update(other.grams)
        self.samples = max(self.samples, other.samples)
        self.source = self.source or other.source
        self.passes += other.passes
        return self


# ---------------------------------------------------------------- accumulation

def _sampled(n: int, per_sample: int, keep: int | None, rng: np.random.Generator | None) -> np.ndarray | None:
    """Flat sample-major row indices: ``keep`` random rows of each sample, or None for all rows."""
    if keep is None or rng is None or per_sample <= keep:
        return None
    pick = np.argsort(rng.random((n, per_sample)), axis=1)[:, :keep]
    return (np.arange(n)[:, None] * per_sample + np.sort(pick, axis=1)).ravel()


def gram_rows(x: np.ndarray, spec: GramSpec, keep: int | None = None, rng: np.random.Generator | None = None):
    """Yield [groups, R, D] float64 row blocks of a layer input, in bounded chunks.

    With ``keep``, at most that many rows (im2col patches, tokens) per sample, drawn from ``rng``.
    """
    if spec.conv is None:
        rows = np.moveaxis(x, spec.x_axis, -1)
        n = rows.shape[0] if rows.ndim >= 2 else 1                    # the batch axis leads
        rows = rows.reshape(-1, rows.shape[-1])
        pick = _sampled(n, len(rows) // n, keep, rng)
        rows = rows if pick is None else rows[pick]
        step = max(1, _GRAM_CHUNK_BYTES // (8 * rows.shape[1]))
        for s in range(0, rows.shape[0], step):
            yield rows[s:s + step].astype(_gram_dtype(rows.shape[1]))[None]
        return
    attrs = spec.conv_attrs
    nd = x.ndim - 2
    k, st, d, pads = attrs["kernel_shape"], attrs["strides"], attrs["dilations"], attrs["pads"]
    if attrs["auto_pad"] in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-x.shape[2 + i] // st[i]) for i in range(nd)]
    else:
        if attrs["auto_pad"] == "VALID":
            pads = [0] * (2 * nd)
        out = [(x.shape[2 + i] + pads[i] + pads[i + nd] - (k[i] - 1) * d[i] - 1) // st[i] + 1 for i in range(nd)]
    per_sample = int(np.prod(out))
    rows_per = min(per_sample, keep) if keep else per_sample
    step = max(1, _GRAM_CHUNK_BYTES // (8 * rows_per * max(1, x.shape[1] * int(np.prod(k)))))
    dtype = _gram_dtype(x.shape[1] // max(1, attrs.get("group", 1)) * int(np.prod(k)))
    for s in range(0, x.shape[0], step):
        xs = x[s:s + step].astype(dtype)
        yield taps.conv_patches(xs, **attrs, rows=_sampled(len(xs), per_sample, keep, rng))


def _gram_dtype(width: int):
    """float32 rows (and products) from 256 columns up: twice the BLAS speed and half the memory; a
    chunk's relative rounding (~1e-6) is far below OBS's damping (1% of the mean diagonal) and the
    refit's ridge, and chunks are summed in float64."""
    return np.float32 if width >= 256 else np.float64


def _add_gram(store: dict[str, GramStats], key: str, x: np.ndarray, spec: GramSpec, keep: int | None,
              rng: np.random.Generator) -> None:
    for p in gram_rows(x, spec, keep, rng):
        g = p.transpose(0, 2, 1) @ p     # batched BLAS (einsum loops in C: 9x slower on depthwise groups)
        if key not in store:
            store[key] = GramStats(np.zeros(g.shape), sums=np.zeros(g.shape[:2]))
        store[key].gram += g
        store[key].sums += p.sum(axis=1, dtype=np.float64)
        store[key].rows += p.shape[1]


def collect(proto: onnx.ModelProto, needs: Needs, data: DataSource, *, batch_size: int = 32,
            limit: int | None = None, bins: int = DEFAULT_BINS, gram_rows_per_sample: int | None = GRAM_ROWS,
            seed: int = 0, progress: Callable | None = None) -> CalibrationStats:
    """Stream ``data`` through ``proto`` once and accumulate what ``needs`` asks for.

    A model whose batch dimension is fixed gets batches of exactly that size (samples
    that do not fill the last one are left out). Gram matrices use at most
    ``gram_rows_per_sample`` rows (conv patches, tokens) of each sample, drawn with ``seed``.
    """
    rng = np.random.default_rng(seed)
    bins = max(2, bins + bins % 2)
    batch_size, limit = fit_fixed_batch(proto, data, batch_size, limit)
    inputs = {vi.name for vi in ir.graph_inputs(proto)}
    wanted = {t for t, _ in needs.moments | needs.hist} | {s.x for s in needs.grams.values()}
    hist_keys = needs.hist
    by_tensor: dict[str, list[tuple[str, int]]] = {}
    for key in needs.moments | needs.hist:
        by_tensor.setdefault(key[0], []).append(key)
    stats = CalibrationStats(source=getattr(data, "kind", ""))

    tapped = sorted(wanted - inputs)
    first_chunk = tapped[0] if tapped else None

    def visit(out: dict[str, np.ndarray], feed: dict[str, np.ndarray]) -> None:
        # with several chunks every batch comes once per chunk: graph inputs are counted in the first only
        first = first_chunk is None or first_chunk in out
        values = {**feed, **out} if first else out
        for name, keys in by_tensor.items():
            if name not in values:
                continue
            x = values[name]
            for key in keys:
                if key not in stats.tensors:
                    stats.tensors[key] = TensorStats.empty(key[1], x.shape[key[1]])
                stats.tensors[key].add(x, bins if key in hist_keys else None)
        for key, spec in needs.grams.items():
            if spec.x in values:
                _add_gram(stats.grams, key, values[spec.x], spec, gram_rows_per_sample, rng)
        if first:
            stats.samples += len(next(iter(feed.values())))

    try:
        taps.tap(proto, tapped, data, visit, batch_size=batch_size, limit=limit, max_outputs=MAX_OUTPUTS,
                      progress=progress, description="calibration statistics")
    except Exception as e:
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OnnxPruneError(f"onnxruntime failed on the calibration data: {msg}; check that the data "
                             "matches the model's inputs (or pass --input-shape)") from None
    stats.passes = max(1, -(-len(tapped) // MAX_OUTPUTS))
    return stats


def fit_fixed_batch(proto: onnx.ModelProto, data: DataSource, batch_size: int, limit: int | None):
    """``batch_size`` and ``limit`` fitted to a model whose inputs share one fixed batch size."""
    dims = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    fixed = dims.pop() if len(dims) == 1 else None
    if not isinstance(fixed, int) or fixed <= 0:
        return batch_size, limit
    n = data.num_samples if limit is None else min(limit, data.num_samples)
    if n < fixed:
        raise OnnxPruneError(f"the model's batch dimension is fixed at {fixed}, the calibration data has only "
                             f"{n} samples")
    return fixed, n - n % fixed
