"""Prune time in calibration passes: a unit that does not depend on the machine or its load.

``reference_pass(proto, data)`` times one plain onnxruntime pass of the original model over the
calibration data (optimised session, batches of 32, or the model's fixed batch). With more than
``max_samples`` samples only the first ``max_samples`` are timed, after one warm-up batch, and the
time is scaled to all of them (onnxruntime time is linear in the number of equal-shaped batches).
``in_passes(seconds, ref)`` is then the prune's wall time over that pass.
"""

from __future__ import annotations

import time

import onnx

from .. import ir, runtime
from ..data import ArrayData


def reference_pass(proto: onnx.ModelProto, data: ArrayData, *, batch_size: int = 32, max_samples: int = 64) -> dict:
    """``{"pass_seconds", "samples", "timed_samples", "batch_size"}`` of one pass of ``proto`` over ``data``."""
    firsts = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    fixed = firsts.pop() if len(firsts) == 1 else None
    if isinstance(fixed, int) and fixed > 0:
        batch_size = fixed
    n = data.num_samples
    sess = runtime.session(proto)
    outputs = [o.name for o in proto.graph.output]
    batches = data.batches(batch_size)
    warm = next(batches, None)
    if warm is None:
        return {"pass_seconds": 0.0, "samples": 0, "timed_samples": 0, "batch_size": batch_size}
    runtime.run(sess, warm, outputs)    # warm-up: allocations and kernel choice, not part of a pass
    timed, seconds, cpu = 0, 0.0, 0.0
    # timed: the batches after the warm-up one (or the warm-up batch again when it is the only one)
    for feed in ([warm] if n <= batch_size else batches):
        t, c = time.perf_counter(), time.process_time()
        runtime.run(sess, feed, outputs)
        seconds += time.perf_counter() - t
        cpu += time.process_time() - c
        timed += len(next(iter(feed.values())))
        if timed >= max_samples:
            break
    per_sample = seconds / max(timed, 1)
    return {"pass_seconds": round(per_sample * n, 4), "pass_cpu_seconds": round(cpu / max(timed, 1) * n, 4),
            "samples": n, "timed_samples": timed, "batch_size": batch_size}


def in_passes(prune_seconds: float, ref: dict, prune_cpu_seconds: float | None = None) -> dict:
    """The stable report block: prune wall time, the reference pass, and their ratio; the same in CPU
    seconds of this process (all its threads), which a shared machine's load disturbs far less."""
    p, c = ref.get("pass_seconds") or 0.0, ref.get("pass_cpu_seconds") or 0.0
    out = {"prune_seconds": round(prune_seconds, 2), **ref, "passes": round(prune_seconds / p, 2) if p > 0 else None}
    if prune_cpu_seconds is not None:
        out["prune_cpu_seconds"] = round(prune_cpu_seconds, 2)
        out["cpu_passes"] = round(prune_cpu_seconds / c, 2) if c > 0 else None
    return out


__all__ = ["in_passes", "reference_pass"]
