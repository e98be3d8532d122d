#!/usr/bin/env python3
"""Compare the importance criteria on one model at fixed MACs budgets (no fine-tuning).

For each target (fraction of the original MACs) the uniform per-group ratio that
reaches it is found once by bisection — channel counts, hence MACs, do not depend
on the criterion — then every criterion prunes the model at that ratio, the result
is verified against the masked original, and its top-1 accuracy is measured in
onnxruntime on the test set. The table replaces the "Measured comparison" section
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
from onnxprune.importance import CRITERIA, requires_data  # noqa: E402

SECTION = "## Measured comparison"


def ratio_for(model: ir.Model, target: float, steps: int = 10) -> tuple[float, float]:
    """The uniform ratio whose MACs fraction comes closest to ``target`` (bisection), and that fraction."""
    def frac(r: float) -> float:
        res = onnxprune.prune(model, policy=onnxprune.Policy(ratio=r), criterion="l2", verify=False)
        return res.after.macs / res.before.macs

    lo, hi = 0.0, 0.95
    best = (0.0, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        f = frac(mid)
        if abs(f - target) < abs(best[1] - target):
            best = (mid, f)
        lo, hi = (mid, hi) if f > target else (lo, mid)
    return best


def run(args) -> dict:
    model = ir.load(args.model)
    calib = load_npz(args.calib, model.proto)
    test = load_npz(args.test, model.proto)
    base = validate.accuracy(model, test, limit=args.limit)["top1"]
    rows = []
    criteria = args.criteria or list(CRITERIA)
    for target in args.targets:
        ratio, frac = ratio_for(model, target)
        print(f"target {target:.2f}x MACs: ratio {ratio:.4f} gives {frac:.3f}x", file=sys.stderr)
        for name in criteria:
            t = time.perf_counter()
            try:
                res = onnxprune.prune(model, policy=onnxprune.Policy(ratio=ratio), criterion=name,
                                      calib=calib if requires_data(name) else None, verify=True)
            except onnxprune.OnnxPruneError as e:
                rows.append({"target": target, "criterion": name, "error": str(e)})
                print(f"  {name:12s} skipped: {e}", file=sys.stderr)
                continue
            total = time.perf_counter() - t
            acc = validate.accuracy(res.proto, test, limit=args.limit)["top1"]
            rows.append({"target": target, "criterion": name, "ratio": ratio,
                         "macs_fraction": res.after.macs / res.before.macs,
                         "params_fraction": res.after.params / res.before.params,
                         "top1": acc, "score_seconds": res.seconds.get("score", 0.0), "prune_seconds": total,
                         "verified": bool(res.verification and res.verification.passed)})
            print(f"  {name:12s} top1 {acc:.4f}  score {rows[-1]['score_seconds']:.2f}s", file=sys.stderr)
    return {"model": str(args.model), "calib": str(args.calib), "test": str(args.test),
            "calib_samples": calib.num_samples, "test_samples": min(test.num_samples, args.limit or 10**12),
            "baseline_top1": base, "rows": rows, "machine": f"{platform.machine()}, {platform.python_version()}"}


def table(result: dict) -> str:
    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    names = list(dict.fromkeys(r["criterion"] for r in result["rows"]))
    by = {(r["target"], r["criterion"]): r for r in result["rows"]}
    head = "| criterion | calib | " + " | ".join(
        f"top-1 @ {t:.1f}× MACs | score s" for t in targets) + " |"
    sep = "| --- | --- | " + " | ".join("---: | ---:" for _ in targets) + " |"
    lines = [head, sep]
    for n in names:
        cells = []
        for t in targets:
            r = by.get((t, n), {})
            cells += ([f"{r['top1'] * 100:.2f}%", f"{r['score_seconds']:.2f}"] if "top1" in r else ["—", "—"])
        lines.append(f"| `{n}` | {'yes' if requires_data(n) else 'no'} | " + " | ".join(cells) + " |")
    fracs = ", ".join(f"{t:.1f}× → ratio {by[(t, names[0])]['ratio']:.3f} ({by[(t, names[0])]['macs_fraction']:.3f}× "
                      f"MACs, {by[(t, names[0])]['params_fraction']:.3f}× params)"
                      for t in targets if "ratio" in by.get((t, names[0]), {}))
    skipped = [f"`{r['criterion']}` at {r['target']:.1f}×: {r['error']}" for r in result["rows"] if "error" in r]
    out = [SECTION, "",
           f"`tools/bench_criteria.py` on `{Path(result['model']).name}`: uniform per-group ratio found by "
           f"bisection for each MACs target ({fracs}); every criterion prunes at that ratio, the result is "
           f"verified against the masked original, then top-1 is measured in onnxruntime on "
           f"{result['test_samples']} test images. No fine-tuning, no reconstruction. Calibration criteria "
           f"use {result['calib_samples']} training images. Baseline top-1: "
           f"{result['baseline_top1'] * 100:.2f}%. Score seconds: time to score all groups (including the "
           f"calibration pass) on {result['machine']}, 2 cores.", "", *lines, ""]
    if skipped:
        out += ["Skipped: " + "; ".join(skipped), ""]
    return "\n".join(out)


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
