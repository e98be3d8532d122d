"""Quantization hand-off: INT8 through onnxruntime's quantizer, fed by onnxprune's own data readers,
measured before and after.

    q, how = quantize(proto, calib)                       # static QDQ INT8, per-channel weights
    q, how = quantize(proto, None, dynamic=True)          # MatMul-heavy transformers: no data
    report = measure(q, proto, data, original=orig)       # accuracy/fidelity and latency, interleaved

Static quantization calibrates activation ranges (MinMax) on batches of ``calib`` (an .npz or an
image folder, opened like every other data flag). Quantization is approximate: nothing is
verified exactly, and the report measures the INT8 model against the float model it came from
and, for a pruned model, against the original (the whole chain's loss) on held-out ``data``.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from .. import ir, runtime
from ..data import ArrayData
from ..errors import OnnxPruneError

CALIB_SAMPLES = 256


def calibration_batches(proto: onnx.ModelProto, calib: ArrayData, samples: int = CALIB_SAMPLES,
                        batch_size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the model's inputs from ``calib`` (at most ``samples`` samples; batch 1 when the
    model fixes it)."""
    names = [vi.name for vi in ir.graph_inputs(proto)]
    missing = [n for n in names if n not in calib.arrays]
    if missing:
        raise OnnxPruneError(f"the calibration data has no array for model input '{missing[0]}' "
                             f"(arrays: {sorted(calib.arrays)})")
    fixed = {ir.input_dims(vi)[0] for vi in ir.graph_inputs(proto) if ir.input_dims(vi)}
    size = next((d for d in fixed if isinstance(d, int) and d > 0), batch_size)
    for feed in calib.batches(size, samples):
        yield {n: feed[n] for n in names}


def quantize(proto: onnx.ModelProto, calib: ArrayData | None, *, dynamic: bool = False, per_channel: bool = True,
             samples: int = CALIB_SAMPLES) -> tuple[onnx.ModelProto, dict]:
    """The INT8 model and a description of what was done (see the module docstring)."""
    if samples < 1:
        raise OnnxPruneError(f"--calib-samples {samples}: must be at least 1")
    if not dynamic and (calib is None or calib.kind == "random"):
        raise OnnxPruneError("static INT8 quantization needs real calibration data: add --calib DATA.npz (or an "
                             "image folder), or pass --dynamic for weight-only ranges")
    proto = ir.materialize(ir.Model(proto)).proto if ir.is_lazy(proto) else proto
    feeds = None if dynamic else calibration_batches(proto, calib, samples)
    q, how = runtime.quantize(proto, feeds, dynamic=dynamic, per_channel=per_channel)
    if not dynamic:
        how["calib_samples"] = min(samples, calib.num_samples)
        how["calib_data"] = calib.source or calib.kind
    return q, how


def measure(quantized: onnx.ModelProto, float_model: onnx.ModelProto, data: ArrayData | None, *,
            original: onnx.ModelProto | None = None, bench_runs: int = 20, batch_size: int = 64,
            input_shapes: dict[str, list[int]] | None = None) -> dict:
    """Accuracy (with labels) or fidelity of the INT8 model against the float model (and, with
    ``original``, against it: a pruned-then-quantized model's whole loss), and p50 latency of
    every model timed interleaved on the current runtime."""
    from ..measure import latency, quality

    out: dict = {}
    models = {"int8": quantized, "float": float_model}
    if original is not None:
        models["original"] = original
    if data is not None:
        out["data"], out["samples"] = data.source or data.kind, data.num_samples
        labels = data.labels is not None
        for name, model in models.items():
            if name == "int8":
                continue
            m = quality.compare(quantized, data, model, batch_size=batch_size, output=None, want_accuracy=labels)
            out["accuracy"] = m.accuracy
            out[f"accuracy_{name}"] = m.reference_accuracy
            out[f"fidelity_to_{name}"] = m.fidelity
        if labels:
            for name in models:
                if name != "int8" and out.get(f"accuracy_{name}"):
                    out[f"points_vs_{name}"] = round(100 * (out["accuracy"]["top1"] - out[f"accuracy_{name}"]["top1"]),
                                                     3)
    if bench_runs:
        bench = latency.benchmark(models, warmup=5, runs=bench_runs, input_shapes=input_shapes)
        first = next(iter(bench.values()))
        out["latency"] = {"runtime": first.runtime, "provider": first.provider, "threads": first.threads,
                          "batch_size": first.batch_size, "interleaved": True,
                          "p50_ms": {n: s.p50 for n, s in bench.items()}}
        for name in models:
            if name != "int8" and bench[name].p50 > 0:
                out["latency"][f"ratio_to_{name}"] = bench["int8"].p50 / bench[name].p50
    out["exact"] = False
    out["note"] = ("quantization is approximate: measured on --data, not verified" if data is not None else
                   "quantization is approximate and nothing measured its accuracy: add --data (held-out samples)")
    return out
