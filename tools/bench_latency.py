"""Latency of pruned zoo CNNs in onnxruntime against their MACs: writes docs/latency.md and docs/latency.json.

    flock /work/bench.lock python tools/bench_latency.py [--zoo /work/zoo] [--models resnet50 ...] [--seconds 15]

For each model: the 0.5x-MACs budget (one bisected strength) with channel counts
left free (--round-to 1), rounded to 8 and to 16, and with the latency-aware
allocation (--allocation latency, rounded to this machine's SIMD block); then fixed
ratios 0.1/0.3/0.5 rounded to the block. Every candidate is verified, then timed
against the original with interleaved runs (batch 1, onnxruntime's default
threads; as many runs as fit in --seconds per row, 30 to 200). Reports MACs
ratio, latency ratio, whether latency ratio <= 1.15 x MACs ratio and <= 1, and
the 1-minute load average around each row. The prose from "## What this shows"
on is kept by hand: it is carried over from the existing file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import onnxruntime as ort

from onnxprune import pipeline
from onnxprune.search import budget
from onnxprune.measure import latency
from onnxprune.plan import Policy

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "efficientnet_b0", "convnext_tiny"]
NOTES_HEADING = "## What this shows"


def configs(block: int) -> list[dict]:
    """(label, round_to, allocation, ratio or None for the 0.5x-MACs budget)."""
    out = [{"config": f"target MACs 0.5, round-to {rt}", "round_to": rt, "allocation": "uniform"}
           for rt in (1, 8, 16)]
    out.append({"config": f"target MACs 0.5, round-to {block}, latency allocation", "round_to": block,
                "allocation": "latency"})
    out += [{"config": f"ratio {r}, round-to {block}", "round_to": block, "ratio": r} for r in (0.1, 0.3, 0.5)]
    return out


def measure(pruner, result, runs: int) -> dict:
    load = os.getloadavg()[0]
    b = latency.benchmark({"after": result.proto, "before": pruner.original.proto}, warmup=10, runs=runs,
                          input_shapes=pruner.analysis.input_shapes)
    return {"macs_ratio": result.after.macs / result.before.macs,
            "params_ratio": result.after.params / result.before.params,
            "latency_ratio": b.ratio_p50, "p50_before_ms": b["before"].p50, "p50_after_ms": b["after"].p50,
            "threads": b["before"].threads, "runs": runs, "verified": bool(result.verification and result.verification.passed),
            "load": [round(load, 2), round(os.getloadavg()[0], 2)]}


def run_config(pruner, cfg: dict, runs: int) -> dict:
    policy = Policy(round_to=cfg["round_to"] if cfg["round_to"] > 1 else None)
    if "ratio" in cfg:
        result = pruner.finish(pruner.plan(Policy(ratio=cfg["ratio"], round_to=policy.round_to)),
                               reconstruct="none")
        strength = cfg["ratio"]
    else:
        outcome, result = budget.search(pruner, policy, budget.Budget(macs=0.5), reconstruct="none",
                                        allocation=cfg["allocation"])
        strength = round(outcome.policy.ratio, 3)
    return {"config": cfg["config"], "ratio": strength, **measure(pruner, result, runs)}


def runs_for(pruner, seconds: float, low: int = 30, high: int = 200) -> int:
    """Timed runs per model so one row's timing takes about ``seconds`` (both models, interleaved)."""
    p50 = latency.benchmark({"m": pruner.original.proto}, warmup=3, runs=5,
                            input_shapes=pruner.analysis.input_shapes)["m"].p50
    return max(low, min(high, int(seconds * 1e3 / (2 * p50))))


def run_model(path: Path, seconds: float, block: int) -> list[dict]:
    pruner = pipeline.Pruner(path)
    runs = runs_for(pruner, seconds)
    print(f"  {runs} runs per model per row", flush=True)
    rows = []
    for cfg in configs(block):
        try:
            rows.append(run_config(pruner, cfg, runs))
        except Exception as e:  # a failure is a row, not the end of the benchmark
            rows.append({"config": cfg["config"], "error": f"{type(e).__name__}: {e}"})
        print(f"  {rows[-1]}", flush=True)
    return rows


def render(results: dict, meta: dict, notes: str = "") -> str:
    lines = ["# Latency of pruned models in onnxruntime", "",
             "Produced by `tools/bench_latency.py`. Every candidate is verified against its masked original, "
             "then timed against the original with interleaved runs (batch 1, one input, "
             f"onnxruntime {meta['onnxruntime']} CPU execution provider, default threads = {meta['threads']}; "
             + (f"{meta['runs']} timed runs per model and row)." if "runs" in meta else
                "30 to 200 timed runs per model and row, as many as fit in about 15 s; the JSON has the count)."),
             "", f"Machine: {meta['machine']}; SIMD block of onnxruntime's NCHWc kernels here: "
             f"{meta['simd_block']} channels. Measured {meta['date']}; load average (1, 5, 15 min) at start "
             f"{meta['load_start']}, at end {meta['load_end']}; the last column gives the 1-minute load "
             "before and after each row's timing. The machine was shared with other jobs, so absolute "
             "milliseconds are noisy; the interleaved ratio is what to read.", "",
             "Target (issue 6): at 0.5x MACs, latency ratio within 1.15x of the MACs ratio, and no pruned model "
             "slower than its original at any ratio tried.", "",
             "| model | configuration | strength | MACs kept | params kept | latency after/before | "
             "latency / MACs | p50 before (ms) | p50 after (ms) | within 1.15x | not slower | load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|:---:|---|"]
    for model, rows in results.items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {model} | {r['config']} | | | | error: {r['error'][:80]} | | | | | | |")
                continue
            x = r["latency_ratio"] / r["macs_ratio"]
            lines.append(f"| {model} | {r['config']} | {r['ratio']} | {r['macs_ratio']:.3f} | "
                         f"{r['params_ratio']:.3f} | {r['latency_ratio']:.3f} | {x:.2f} | {r['p50_before_ms']:.2f} | "
                         f"{r['p50_after_ms']:.2f} | {'yes' if x <= 1.15 else 'no'} | "
                         f"{'yes' if r['latency_ratio'] <= 1.0 else 'no'} | {r['load'][0]}, {r['load'][1]} |")
    return "\n".join(lines) + "\n" + ("\n" + notes if notes else "")


def write_markdown(path: Path, results: dict, meta: dict) -> None:
    """The table, followed by the hand-kept notes of the file being replaced."""
    old = path.read_text() if path.exists() else ""
    notes = old[old.index(NOTES_HEADING):] if NOTES_HEADING in old else ""
    path.write_text(render(results, meta, notes))


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    feats = latency.cpu_features()
    simd = "AVX-512" if feats.get("AVX512F") else "AVX2" if feats.get("AVX2") else "no AVX2"
    return f"{platform.machine()} {cpu}, {simd}, {os.cpu_count()} cores, no GPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    ap.add_argument("--seconds", type=float, default=15.0, help="timing per row, both models (30-200 runs)")
    ap.add_argument("--out", default="docs/latency.md")
    ap.add_argument("--json", default="docs/latency.json")
    ap.add_argument("--render", metavar="JSON", help="measure nothing: rewrite --out from a saved JSON")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        write_markdown(Path(args.out), saved["results"], saved["meta"])
        return 0
    meta = {"onnxruntime": ort.__version__, "threads": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                                time.gmtime()),
            "machine": machine(), "simd_block": latency.simd_block(),
            "load_start": [round(x, 2) for x in os.getloadavg()]}
    results = {}
    for name in args.models:
        t = time.time()
        print(name, flush=True)
        results[name] = run_model(Path(args.zoo) / f"{name}.onnx", args.seconds, meta["simd_block"])
        print(f"{name}: {time.time() - t:.0f}s", flush=True)
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    write_markdown(Path(args.out), results, meta)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
