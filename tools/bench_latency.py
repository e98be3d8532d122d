"""Latency of pruned zoo CNNs in onnxruntime against their MACs: writes docs/latency.md.

    python tools/bench_latency.py [--zoo /work/zoo] [--models resnet50 mobilenet_v2 ...] [--runs 60]

For each model: the 0.5x-MACs budget (bisection on the uniform ratio) with and
without --round-to 8, and fixed ratios 0.1/0.3/0.5 with --round-to 8; every
candidate is verified, then timed against the original with interleaved runs
(batch 1, onnxruntime's default threads). Reports MACs ratio, latency ratio and
whether latency ratio <= 1.15 x MACs ratio and <= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import onnxruntime as ort

from onnxprune import budget, latency, pipeline
from onnxprune.plan import Policy

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "resnet18", "regnet_y_400mf"]


def measure(pruner, result, runs: int) -> dict:
    b = latency.benchmark({"after": result.proto, "before": pruner.original.proto}, warmup=10, runs=runs,
                          input_shapes=pruner.analysis.input_shapes)
    return {"macs_ratio": result.after.macs / result.before.macs,
            "params_ratio": result.after.params / result.before.params,
            "latency_ratio": b.ratio_p50, "p50_before_ms": b["before"].p50, "p50_after_ms": b["after"].p50,
            "threads": b["before"].threads, "verified": bool(result.verification and result.verification.passed)}


def run_model(path: Path, runs: int) -> list[dict]:
    pruner = pipeline.Pruner(path)
    rows = []
    for round_to in (None, 8):
        policy = Policy(round_to=round_to)
        outcome, result = budget.search(pruner, policy, budget.Budget(macs=0.5), reconstruct="none")
        rows.append({"config": f"target MACs 0.5{', round-to 8' if round_to else ''}",
                     "ratio": round(outcome.policy.ratio, 3), **measure(pruner, result, runs)})
    for ratio in (0.1, 0.3, 0.5):
        result = pruner.finish(pruner.plan(Policy(ratio=ratio, round_to=8)), reconstruct="none")
        rows.append({"config": f"ratio {ratio}, round-to 8", "ratio": ratio, **measure(pruner, result, runs)})
    return rows


def render(results: dict, meta: dict) -> str:
    lines = ["# Latency of pruned models in onnxruntime", "",
             "Produced by `tools/bench_latency.py`. Every candidate is verified against its masked original, "
             "then timed against the original with interleaved runs (batch 1, one input, "
             f"onnxruntime {meta['onnxruntime']} CPU execution provider, default threads = {meta['threads']}).",
             "", f"Machine: {meta['machine']}; measured {meta['date']}; load average at start "
             f"{meta['load_start']}, at end {meta['load_end']} (the machine was shared with other jobs, so "
             "absolute milliseconds are noisy; the interleaved ratio is what to read).", "",
             "Target (issue 6): at 0.5x MACs, latency ratio within 1.15x of the MACs ratio, and no pruned model "
             "slower than its original at any ratio tried.", "",
             "| model | configuration | ratio | MACs kept | params kept | latency after/before | "
             "p50 before (ms) | p50 after (ms) | within 1.15x MACs | not slower |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|:---:|"]
    for model, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {model} | {r['config']} | | | | error: {r['error'][:80]} | | | | |")
                continue
            ok = r["latency_ratio"] <= 1.15 * r["macs_ratio"]
            lines.append(f"| {model} | {r['config']} | {r['ratio']} | {r['macs_ratio']:.3f} | "
                         f"{r['params_ratio']:.3f} | {r['latency_ratio']:.3f} | {r['p50_before_ms']:.2f} | "
                         f"{r['p50_after_ms']:.2f} | {'yes' if ok else 'no'} | "
                         f"{'yes' if r['latency_ratio'] <= 1.0 else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", default="docs/latency.md")
    ap.add_argument("--json", default="docs/latency.json")
    args = ap.parse_args(argv)
    meta = {"onnxruntime": ort.__version__, "threads": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
            "load_start": os.getloadavg()[0]}
    results = {}
    for name in args.models:
        path = Path(args.zoo) / f"{name}.onnx"
        t = time.time()
        try:
            results[name] = run_model(path, args.runs)
        except Exception as e:  # a failure is a row, not the end of the benchmark
            results[name] = [{"config": "all", "error": f"{type(e).__name__}: {e}"}]
        print(f"{name}: {time.time() - t:.0f}s", flush=True)
    meta["load_end"] = os.getloadavg()[0]
    Path(args.out).write_text(render(results, meta))
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
