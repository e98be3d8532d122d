"""Latency of models in onnxruntime, measured so that a ratio between two of them is fair.

    result = benchmark({"pruned.onnx": pruned, "orig.onnx": orig}, None, input_shapes=shapes)
    result["pruned.onnx"].p50      # milliseconds
    result.ratio_p50               # p50 of the first model / p50 of the second

Sessions are created once per model. With ``interleave`` (the default) the
models take turns run by run (A B A B ...), warm-up included, so slow phases of
a noisy shared machine hit every model alike. Every model is fed the same
inputs: ``feeds`` (a feed dict, or the first ``batch_size`` samples of an
:class:`ArrayData`), or synthetic ones made from the first model's input shapes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx

from .. import ir, runtime
from ..data import ArrayData, fit_empty, random_data
from ..errors import OnnxPruneError
from .quality import ModelLike, check_same_inputs, proto_of, run_error

Feeds = Union[dict[str, np.ndarray], ArrayData, None]


@dataclass
class LatencyStats:
    """Wall-clock latency of one model, in milliseconds per ``session.run`` of one batch."""

    p50: float
    p90: float
    mean: float
    min: float
    std: float
    runs: int
    threads: int
    provider: str
    batch_size: int
    runtime: str = "onnxruntime"

    @classmethod
    def from_times(cls, times_ms: list[float], *, threads: int, provider: str, batch_size: int,
                   runtime: str = "onnxruntime") -> "LatencyStats":
        t = np.asarray(times_ms, dtype=np.float64)
        return cls(p50=float(np.percentile(t, 50)), p90=float(np.percentile(t, 90)), mean=float(t.mean()),
                   min=float(t.min()), std=float(t.std()), runs=len(t), threads=threads, provider=provider,
                   batch_size=batch_size, runtime=runtime)

    def to_json(self) -> dict:
        return {"p50_ms": self.p50, "p90_ms": self.p90, "mean_ms": self.mean, "min_ms": self.min,
                "std_ms": self.std, "runs": self.runs}


class Benchmark(dict):
    """``name -> LatencyStats`` in the order the models were given, plus the run settings."""

    @property
    def ratio_p50(self) -> float | None:
        """p50 of the first model over p50 of the second (candidate / reference), with two models."""
        if len(self) != 2:
            return None
        first, second = self.values()
        return first.p50 / second.p50 if second.p50 > 0 else None

    def _first(self) -> LatencyStats:
        return next(iter(self.values()))

    def to_json(self) -> dict:
        s = self._first()
        return {"models": {name: st.to_json() for name, st in self.items()}, "ratio_p50": self.ratio_p50,
                "threads": s.threads, "provider": s.provider, "batch_size": s.batch_size}


def cpu_features() -> dict[str, bool]:
    """The SIMD features numpy detected on this CPU (e.g. ``{"AVX2": True, "AVX512F": True, ...}``)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return {}
    return dict(features)


def simd_block(features: dict[str, bool] | None = None) -> int:
    """Channels per SIMD block of onnxruntime's CPU kernels on this machine: 16 with AVX-512, else 8.

    onnxruntime's MLAS blocks channels by this width (``NchwcBlockSize`` in ``mlas/lib/platform.cpp``:
    16 when AVX-512F is present, 8 on AVX2); a convolution whose channel counts are not multiples of it
    is left out of the NCHWc layout and runs on slower kernels. 8 is also what other back ends favour.
    """
    features = cpu_features() if features is None else features
    return 16 if features.get("AVX512F") else 8


def _positive(name: str, value: int, low: int = 1) -> None:
    if value < low:
        raise OnnxPruneError(f"{name} {value}: must be at least {low}")


def make_feeds(proto: onnx.ModelProto, feeds: Feeds, batch_size: int,
               input_shapes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
    """The one feed dict every model is timed on (see the module docstring)."""
    if isinstance(feeds, dict):
        return feeds
    if isinstance(feeds, ArrayData):
        if feeds.num_samples < batch_size:
            raise OnnxPruneError(f"the data has {feeds.num_samples} samples, fewer than batch size {batch_size}")
        return next(feeds.batches(batch_size))
    shapes = ir.resolve_input_shapes(proto, input_shapes)
    return random_data(proto, shapes, num_samples=batch_size).arrays


def _check_batch(name: str, sess, feed: dict[str, np.ndarray]) -> None:
    for i in sess.inputs:
        if i.name not in feed:
            raise OnnxPruneError(f"{name}: no input array for '{i.name}' (given: {sorted(feed)})")
        fixed = i.shape[0] if i.shape else None
        n = feed[i.name].shape[0] if feed[i.name].ndim else None
        if isinstance(fixed, int) and fixed > 0 and n is not None and n != fixed:
            raise OnnxPruneError(f"{name}: input '{i.name}' has a fixed batch of {fixed}; "
                                 f"use --batch-size {fixed}")


def _threads_used(sess, threads: int | None) -> int:
    if threads:
        return threads
    n = sess.threads
    return n if n > 0 else (os.cpu_count() or 1)


def _run_ms(sess, feed: dict[str, np.ndarray]) -> float:
    """Milliseconds of one run of ``sess`` on ``feed``."""
    try:
        return sess.timed_run(feed)
    except Exception as e:
        raise run_error(e) from None


def benchmark(models: dict[str, ModelLike], feeds: Feeds = None, *, warmup: int = 10, runs: int = 50,
              threads: int | None = None, batch_size: int = 1, interleave: bool = True,
              input_shapes: dict[str, list[int]] | None = None) -> Benchmark:
    """Time every model ``runs`` times after ``warmup`` untimed runs; see the module docstring.

    ``threads`` sets onnxruntime's intra-op threads (None: its default, recorded as the CPU count).
    With a feed dict, ``batch_size`` is taken from the arrays themselves.
    """
    if not models:
        raise OnnxPruneError("no model to benchmark")
    _positive("--runs", runs)
    _positive("--warmup", warmup, 0)
    _positive("--batch-size", batch_size)
    if threads is not None:
        _positive("--threads", threads)
    names = list(models)
    protos = [proto_of(models[n]) for n in names]
    for p in protos[1:]:
        check_same_inputs(protos[0], p)
    feed = make_feeds(protos[0], feeds, batch_size, input_shapes)
    batch = len(next(iter(feed.values())))
    sessions = [runtime.session(p, role="deployed", threads=threads, spinning=not interleave) for p in protos]
    # each model its own empty KV caches (a pruned model's have fewer heads)
    fed = [{k: fit_empty(v, shape.get(k)) for k, v in feed.items()}
           for shape in ({i.name: i.shape for i in s.inputs} for s in sessions)]
    for n, s, f in zip(names, sessions, fed):
        _check_batch(n, s, f)
    order = _schedule(len(sessions), warmup + runs, interleave)
    times: list[list[float]] = [[] for _ in sessions]
    for i in order:
        times[i].append(_run_ms(sessions[i], fed[i]))
    provider = sessions[0].device
    used = _threads_used(sessions[0], threads)
    kind = sessions[0].runtime
    return Benchmark({n: LatencyStats.from_times(t[warmup:], threads=used, provider=provider, batch_size=batch,
                                                 runtime=kind)
                      for n, t in zip(names, times)})


def _schedule(n_models: int, n_runs: int, interleave: bool) -> list[int]:
    """Which model runs when: ``0 1 0 1 ...`` interleaved, else ``0 0 ... 1 1 ...``."""
    if interleave:
        return [m for _ in range(n_runs) for m in range(n_models)]
    return [m for m in range(n_models) for _ in range(n_runs)]
