#!/usr/bin/env python3
"""ResNet-50 at ratio 0.3: the ``onnxprune prune`` command end to end vs Torch-Pruning's prune step.

onnxprune: wall time of the subprocess ``onnxprune prune resnet50.onnx -o OUT --ratio
0.3`` (Python start, imports, load, analyze, score, plan, rewrite, verify in
onnxruntime, measure, save), and the same in process (``onnxprune.prune`` + ``save`` in a
worker that has imported onnxprune and done one warm-up run). Torch-Pruning: in one long-lived process of the
torch venv, on a fresh torchvision ``resnet50()`` each run, the time to build
the pruner (which traces the model and builds its DependencyGraph) with L2
magnitude importance, ratio 0.3 and the classifier ignored, plus
``pruner.step()``; importing torch and building the model are not counted.

Runs alternate between the two tools so that both see the same load on a shared
machine; the load average is recorded before each run. Medians go to stdout and
everything to ``--json``; ``--doc`` replaces the marked section of
docs/coverage.md::

    python tools/bench_prune_speed.py --runs 5 --json docs/prune_speed.json --doc docs/coverage.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"


def torch_pruning_runs(runs: int, ratio: float) -> list[dict]:
    """Executed inside the torch venv (``--torch-worker``): Torch-Pruning's prune step, timed per run."""
    import torch
    import torch_pruning as tp
    import torchvision

    example = torch.randn(1, 3, 224, 224)
    out = []
    for _ in range(runs + 1):  # the first run also warms up torch's dispatcher; reported, not counted
        model = torchvision.models.resnet50().eval()
        before = tp.utils.count_ops_and_params(model, example)
        load = os.getloadavg()[0]
        c0, t0 = time.process_time(), time.perf_counter()
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=[model.fc])
        t1 = time.perf_counter()
        pruner.step()
        t2, c2 = time.perf_counter(), time.process_time()
        after = tp.utils.count_ops_and_params(model, example)
        out.append({"build_s": t1 - t0, "step_s": t2 - t1, "total_s": t2 - t0, "cpu_s": c2 - c0, "load": load,
                    "params_kept": after[1] / before[1], "macs_kept": after[0] / before[0]})
    return out


def onnxprune_run(model: Path, ratio: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp:
        load = os.getloadavg()[0]
        c = _children_cpu()
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "onnxprune", "prune", str(model), "-o", f"{tmp}/out.onnx",
                               "--ratio", str(ratio), "--report", f"{tmp}/r.json"],
                              capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        cpu = _children_cpu() - c
        if proc.returncode != 0:
            raise SystemExit(f"onnxprune prune failed: {proc.stderr.strip().splitlines()[-1:]}")
        rep = json.loads(Path(f"{tmp}/r.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "load": load, "steps": rep["seconds"], "verified": rep["verified"],
            "params_kept": rep["params_after"] / rep["params_before"], "macs_kept": rep["macs_after"] / rep["macs_before"]}


def api_runs(model: Path, runs: int, ratio: float) -> list[dict]:
    """Executed in a worker process (``--api-worker``): ``onnxprune.prune`` + ``save`` from the path,
    in process (imports not counted), after one warm-up run that is reported but not counted."""
    import onnxprune

    out = []
    with tempfile.TemporaryDirectory(prefix="onnxprune-speed-") as tmp:
        for _ in range(runs + 1):
            load = os.getloadavg()[0]
            c0, t0 = time.process_time(), time.perf_counter()
            result = onnxprune.prune(str(model), policy=onnxprune.Policy(ratio=ratio))
            onnxprune.save(result, f"{tmp}/out.onnx")
            t1, c1 = time.perf_counter(), time.process_time()
            out.append({"total_s": t1 - t0, "cpu_s": c1 - c0, "load": load, "steps": result.seconds,
                        "verified": result.verification.passed})
            del result
    return out


def api_run(model: Path, ratio: float) -> dict:
    """One warm-up plus one timed in-process run in a fresh onnxprune process (the timed one is returned)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--api-worker", "--runs", "1",
                           "--ratio", str(ratio), "--model", str(model)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"onnxprune API worker failed: {proc.stderr.strip().splitlines()[-3:]}")
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**runs[-1], "warmup_total_s": runs[0]["total_s"]}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def torch_run(python: str, ratio: float) -> dict:
    """One warm-up plus one timed Torch-Pruning run in a fresh torch process (the timed one is returned)."""
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--torch-worker", "--runs", "1",
                           "--ratio", str(ratio)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"Torch-Pruning worker failed: {proc.stderr.strip().splitlines()[-3:]}")
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**runs[-1], "warmup_total_s": runs[0]["total_s"]}


def _versions(torch_python: str) -> dict:
    import onnxruntime
    proc = subprocess.run([torch_python, "-c", "import torch, torch_pruning as tp, torchvision; "
                           "print(torch.__version__, tp.__version__, torchvision.__version__)"],
                          capture_output=True, text=True)
    torch_v, tp_v, tv_v = (proc.stdout.split() + ["?"] * 3)[:3]
    return {"onnxruntime": onnxruntime.__version__, "torch": torch_v, "torch_pruning": tp_v, "torchvision": tv_v}


def section(r: dict) -> str:
    """The markdown table of medians and every run."""
    m, v = r["median"], r["versions"]
    steps = ", ".join(f"{k[len('onnxprune_'):-2]} {m[k]:.2f}" for k in m
                      if k.startswith("onnxprune_") and not k.startswith(("onnxprune_cli", "onnxprune_api")))
    rows = "\n".join(f"| {i + 1} | {t['total_s']:.2f} ({t['build_s']:.2f} + {t['step_s']:.2f}) | {t['cpu_s']:.2f} | "
                      f"{t['load']:.1f} | {o['wall_s']:.2f} | {o['cpu_s']:.2f} | {o['load']:.1f} | "
                      f"{a['total_s']:.2f} | {a['cpu_s']:.2f} |" for i, (t, o, a) in
                      enumerate(zip(r["torch_pruning"], r["onnxprune"], r["onnxprune_api"])))
    o, t = r["onnxprune"][0], r["torch_pruning"][0]
    return "\n".join([
        f"ResNet-50, ratio {r['ratio']}, {r['runs']} alternating runs on {r['cores']} cores, {r['date']} "
        f"(onnxruntime {v['onnxruntime']}; torch {v['torch']}, torchvision {v['torchvision']}, "
        f"Torch-Pruning {v['torch_pruning']}). Medians: **onnxprune CLI {m['onnxprune_cli_s']:.2f} s** end to end, "
        f"**onnxprune API {m['onnxprune_api_s']:.2f} s** in process (`onnxprune.prune` from the path + `save`, "
        f"after a warm-up run), "
        f"**Torch-Pruning {m['torch_pruning_s']:.2f} s** in process (pruner construction with its "
        f"DependencyGraph {m['torch_pruning_build_s']:.2f} s + `step()` {m['torch_pruning_step_s']:.2f} s). "
        f"CPU seconds (user + system, all threads; less sensitive to the load): onnxprune "
        f"CLI {m['onnxprune_cli_cpu_s']:.2f}, API {m['onnxprune_api_cpu_s']:.2f}, "
        f"Torch-Pruning {m['torch_pruning_cpu_s']:.2f}. "
        f"onnxprune steps (median s): {steps}; the rest is Python start, imports and save. "
        f"Kept: onnxprune {o['params_kept']:.1%} params / {o['macs_kept']:.1%} MACs, Torch-Pruning "
        f"{t['params_kept']:.1%} / {t['macs_kept']:.1%}.", "",
        "| run | Torch-Pruning wall s (build + step) | CPU s | load | onnxprune CLI wall s | CPU s | load "
        "| onnxprune API wall s | CPU s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |", rows])

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("/work/zoo/resnet50.onnx"))
    p.add_argument("--torch-python", default="/work/zoo-venv/bin/python")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--json", type=Path)
    p.add_argument("--doc", type=Path, help="markdown file whose speed section is replaced")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--api-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.torch_worker:
        print(json.dumps(torch_pruning_runs(args.runs, args.ratio)))
        return
    if args.api_worker:
        print(json.dumps(api_runs(args.model, args.runs, args.ratio)))
        return
    onx, tor, api = [], [], []
    for i in range(args.runs):
        tor.append(torch_run(args.torch_python, args.ratio))
        onx.append(onnxprune_run(args.model, args.ratio))
        api.append(api_run(args.model, args.ratio))
        print(f"run {i + 1}: Torch-Pruning {tor[-1]['total_s']:.2f}s (load {tor[-1]['load']:.1f}), "
              f"onnxprune CLI {onx[-1]['wall_s']:.2f}s (load {onx[-1]['load']:.1f}), "
              f"onnxprune API {api[-1]['total_s']:.2f}s (load {api[-1]['load']:.1f})", file=sys.stderr)
    med = {"torch_pruning_s": statistics.median(r["total_s"] for r in tor),
           "torch_pruning_build_s": statistics.median(r["build_s"] for r in tor),
           "torch_pruning_step_s": statistics.median(r["step_s"] for r in tor),
           "onnxprune_cli_s": statistics.median(r["wall_s"] for r in onx),
           "onnxprune_api_s": statistics.median(r["total_s"] for r in api),
           "onnxprune_api_cpu_s": statistics.median(r["cpu_s"] for r in api),
           "torch_pruning_cpu_s": statistics.median(r["cpu_s"] for r in tor),
           "onnxprune_cli_cpu_s": statistics.median(r["cpu_s"] for r in onx),
           **{f"onnxprune_{k}_s": statistics.median(r["steps"].get(k, 0.0) for r in onx) for k in onx[0]["steps"]}}
    result = {"model": str(args.model), "ratio": args.ratio, "runs": args.runs, "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "versions": _versions(args.torch_python),
              "median": {k: round(v, 3) for k, v in med.items()}, "onnxprune": onx, "onnxprune_api": api,
              "torch_pruning": tor}
    for k, v in result["median"].items():
        print(f"{k:28s} {v:8.3f}")
    if args.doc:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_coverage import write_doc
        write_doc(args.doc, section(result), BEGIN, END)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
