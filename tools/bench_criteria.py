#!/usr/bin/env python3
"""Compare the importance criteria on one model at fixed MACs budgets (no fine-tuning).

For each target (fraction of the original MACs) the uniform per-group ratio that
reaches it is found once by bisection — channel counts, hence MACs, do not depend
on the criterion. Every criterion scores the groups once; for each target its plan
prunes the model, the result is verified against the masked original, and its
top-1 accuracy is measured in onnxruntime on the test set. The table replaces the "Measured comparison" section
of docs/criteria.md (``--doc``) and the raw numbers go to ``--json``::

    python tools/bench_criteria.py --model models/fmnist_resnet.onnx \
        --calib models/fmnist_calib.npz --test models/fmnist_test.npz \
        --doc docs/criteria.md --json out/bench_criteria.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxprune  # noqa: E402
from onnxprune import ir, validate  # noqa: E402
from onnxprune.data import load_npz  # noqa: E402
from onnxprune.importance import CRITERIA, ScoreContext, fallback_summary, requires_data, score_groups  # noqa: E402,E501

SECTION = "## Measured comparison"


def prune_with(model: ir.Model, analysis, scores: dict, ratio: float, verify: bool):
    plan = onnxprune.make_plan(analysis, scores, onnxprune.Policy(ratio=ratio))
    return onnxprune.prune(model, plan=plan, verify=verify)


def ratio_for(model: ir.Model, analysis, scores: dict, target: float, steps: int = 9) -> tuple[float, float]:
    """The uniform ratio whose MACs fraction comes closest to ``target`` (bisection), and that fraction."""
    lo, hi = 0.0, 0.95
    best = (0.0, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        res = prune_with(model, analysis, scores, mid, verify=False)
        f = res.after.macs / res.before.macs
        if abs(f - target) < abs(best[1] - target):
            best = (mid, f)
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best


def run(args) -> dict:
    model = ir.load(args.model)
    analysis = onnxprune.analyze(model)
    calib = load_npz(args.calib, model.proto)
    test = load_npz(args.test, model.proto)
    base = validate.accuracy(model, test, limit=args.limit)["top1"]
    criteria = args.criteria or list(CRITERIA)
    l2 = score_groups(analysis.prunable, ScoreContext(model.proto, analysis), "l2")
    ratios = {t: ratio_for(model, analysis, l2, t) for t in args.targets}
    for t, (r, f) in ratios.items():
        print(f"target {t:.2f}x MACs: ratio {r:.4f} gives {f:.3f}x", file=sys.stderr)
    rows = []
    for name in criteria:
        ctx = ScoreContext(model.proto, analysis, data=calib if requires_data(name) else None)
        t0 = time.perf_counter()
        try:
            scores = score_groups(analysis.prunable, ctx, name)
        except onnxprune.OnnxPruneError as e:
            rows += [{"target": t, "criterion": name, "error": str(e)} for t in args.targets]
            print(f"  {name:12s} skipped: {e}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - t0
        for target in args.targets:
            ratio, _ = ratios[target]
            res = prune_with(model, analysis, scores, ratio, verify=True)
            acc = validate.accuracy(res.proto, test, limit=args.limit)["top1"]
            rows.append({"target": target, "criterion": name, "ratio": ratio,
                         "macs_fraction": res.after.macs / res.before.macs,
                         "params_fraction": res.after.params / res.before.params,
                         "top1": acc, "score_seconds": seconds, "fallbacks": fallback_summary(ctx, name),
                         "verified": bool(res.verification and res.verification.passed)})
            print(f"  {name:12s} {target:.1f}x top1 {acc:.4f}  score {seconds:.2f}s", file=sys.stderr)
    return {"model": str(args.model), "calib": str(args.calib), "test": str(args.test),
            "calib_samples": calib.num_samples, "test_samples": min(test.num_samples, args.limit or 10**12),
            "baseline_top1": base, "rows": rows, "machine": f"{platform.machine()}, Python {platform.python_version()}"}


def table(result: dict) -> str:
    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    names = list(dict.fromkeys(r["criterion"] for r in result["rows"]))
    by = {(r["target"], r["criterion"]): r for r in result["rows"]}
    lines = ["| criterion | calib | " + " | ".join(f"top-1 @ {t:.1f}× MACs" for t in targets) + " | score s |",
             "| --- | --- | " + " | ".join("---:" for _ in targets) + " | ---: |"]
    for n in names:
        got = [by.get((t, n), {}) for t in targets]
        cells = [f"{r['top1'] * 100:.2f}%" if "top1" in r else "—" for r in got]
        secs = next((f"{r['score_seconds']:.2f}" for r in got if "score_seconds" in r), "—")
        lines.append(f"| `{n}` | {'yes' if requires_data(n) else 'no'} | " + " | ".join(cells) + f" | {secs} |")
    ok = [r for r in result["rows"] if "ratio" in r]
    fracs = ", ".join(f"{t:.1f}× → ratio {r['ratio']:.3f} ({r['macs_fraction']:.3f}× MACs, "
                      f"{r['params_fraction']:.3f}× params)"
                      for t in targets for r in [next(x for x in ok if x["target"] == t)])
    skipped = {r["criterion"]: r["error"] for r in result["rows"] if "error" in r}
    fallbacks = {r["criterion"]: r["fallbacks"] for r in ok if r.get("fallbacks")}
    out = [SECTION, "",
           f"`tools/bench_criteria.py` on `{Path(result['model']).name}`: the uniform per-group ratio for each "
           f"MACs target is found by bisection ({fracs}); each criterion scores the groups once, prunes at "
           f"that ratio, the result is verified against the masked original, then top-1 is measured in "
           f"onnxruntime on {result['test_samples']} test images. No fine-tuning, no reconstruction. "
           f"Calibration criteria use {result['calib_samples']} training images. Baseline top-1: "
           f"{result['baseline_top1'] * 100:.2f}%. Score seconds: scoring every group, calibration pass "
           f"included ({result['machine']}, 2 cores shared with other jobs, so only roughly comparable).",
           "", *lines, ""]
    out += [f"`{n}`: {e}" for n, e in skipped.items()]
    out += [f"`{n}` fell back: {'; '.join(f)}" for n, f in fallbacks.items()]
    return "\n".join(out) + "\n"


def write_doc(path: Path, section: str) -> None:
    text = path.read_text()
    i = text.find(SECTION)
    text = (text[:i] if i >= 0 else text.rstrip() + "\n\n") + section
    path.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/fmnist_resnet.onnx")
    p.add_argument("--calib", default="models/fmnist_calib.npz")
    p.add_argument("--test", default="models/fmnist_test.npz")
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--criteria", nargs="*", help="default: all")
    p.add_argument("--limit", type=int, help="test samples (default: all)")
    p.add_argument("--doc", type=Path, help="markdown file whose measured section is replaced")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    result = run(args)
    section = table(result)
    print(section)
    if args.doc:
        write_doc(args.doc, section)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=lambda o: o.item() if isinstance(
            o, np.generic) else str(o)) + "\n")


if __name__ == "__main__":
    main()
