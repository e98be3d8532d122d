"""Measure unstructured / N:M sparsity and weight sharing; write the results into docs/sparsity.md.

    python tools/bench_sparsity.py                       # Fashion-MNIST model + zoo ResNet-18
    python tools/bench_sparsity.py --skip-zoo --reuse    # rerun Fashion-MNIST, keep the saved zoo rows

For every model: magnitude, Wanda and SparseGPT-style sparsity at 50/70/90% and 2:4, then weight
sharing at K = 16 and 256.  Each row gives accuracy (models with a labelled test set) or fidelity to
the dense model (top-1 agreement and relative output error on held-out inputs), the file size, the
compressed file size (zstd if ``zstandard`` is installed, else gzip) and the wall time.

The Fashion-MNIST model calibrates on ``models/fmnist_calib.npz`` and is scored on
``models/fmnist_test.npz``; the zoo model (ImageNet weights, no labelled data here) calibrates on
random normal inputs and its fidelity is measured on other random inputs.  The results replace
the part of docs/sparsity.md between the ``bench:start`` / ``bench:end`` markers.  Raw numbers per
model go to ``out/bench_sparsity/<model>.json``; ``--reuse`` renders the saved ones of skipped models.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402

from onnxprune.data import ArrayData, load_npz, random_data  # noqa: E402
from onnxprune import ir
from onnxprune.compress import sharing
from onnxprune.compress import sparsity
from onnxprune.measure import quality  # noqa: E402

TARGETS = [("50%", {"sparsity": 0.5}), ("70%", {"sparsity": 0.7}), ("90%", {"sparsity": 0.9}),
           ("2:4", {"pattern": sparsity.Pattern(2, 4)})]
CRITERIA = ("magnitude", "wanda", "sparsegpt")
CLUSTERS = (16, 256)
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


@dataclass
class Case:
    """One model with its calibration and evaluation data."""

    name: str
    model: ir.Model
    calib: ArrayData
    evaluation: ArrayData
    labelled: bool
    note: str


def load_cases(args) -> list[Case]:
    cases = []
    if not args.skip_fmnist:
        m = ir.load(args.fmnist)
        test = load_npz(args.fmnist_test, m.proto)
        if args.test_limit:
            test = test.split(args.test_limit)[0]
        cases.append(Case("fmnist_resnet", m, load_npz(args.fmnist_calib, m.proto), test, True,
                          f"calibration: {Path(args.fmnist_calib).name}; accuracy on {test.num_samples} samples "
                          f"of {Path(args.fmnist_test).name}"))
    if not args.skip_zoo:
        m = ir.load(args.zoo)
        shapes = ir.resolve_input_shapes(m.proto)
        calib = random_data(m.proto, shapes, args.zoo_calib, seed=0)
        ev = random_data(m.proto, shapes, args.zoo_eval, seed=1)
        cases.append(Case(Path(args.zoo).stem, m, calib, ev, False,
                          f"calibration: {args.zoo_calib} random N(0,1) inputs; fidelity on {args.zoo_eval} other "
                          "random inputs (no labelled ImageNet data on this machine)"))
    return cases


def score(case: Case, proto) -> dict:
    """Accuracy (labelled data) and fidelity to the dense model, first output."""
    ev = quality.evaluate(proto, case.evaluation, case.model).to_json()
    (fid,) = list(ev["fidelity"].values())[:1]
    return {"top1": ev["accuracy"]["top1"] if case.labelled else None,
            "agreement": fid["top1_agreement"], "rel_error": fid["rel_error"]}


def measure(case: Case, proto, folder: Path, label: str) -> dict:
    path = folder / f"{case.name}_{re.sub(r'[^0-9a-z]+', '_', label.lower())}.onnx"
    size = ir.save(proto, path)
    row = {"file_bytes": size, "compressed_bytes": sparsity.compressed_size(path), **score(case, proto)}
    path.unlink()
    return row


def plan() -> list[tuple[str, str, object]]:
    """(method, target label, what to run) for every row, in table order."""
    rows = [(c, label, lambda proto, calib, c=c, t=t: sparsity.sparsify(proto, sparsity.Options(criterion=c, **t),
                                                                        calib))
            for c in CRITERIA for label, t in TARGETS]
    return rows + [("share", f"K={k}", lambda proto, calib, k=k: sharing.share(proto, sharing.ShareOptions(clusters=k)))
                   for k in CLUSTERS]


def run_case(case: Case, folder: Path, cache: Path, resume: bool, log) -> dict:
    """Measure every row of ``case``, saving to ``cache`` after each; ``resume`` keeps saved rows."""
    saved = json.loads(cache.read_text()).get("rows", []) if resume and cache.exists() else []
    done = {(r["method"], r["target"]): r for r in saved}
    base = {"file_bytes": case.model.file_bytes, "compressed_bytes": sparsity.compressed_size(case.model.path),
            **score(case, case.model.proto)}
    if case.labelled:
        base["top1"] = quality.accuracy(case.model, case.evaluation)["top1"]
    result = {"name": case.name, "note": case.note, "dense": base, "rows": []}
    for method, label, fn in plan():
        if (method, label) not in done:
            t0 = time.perf_counter()
            res = fn(case.model.proto, case.calib)
            seconds = time.perf_counter() - t0
            done[(method, label)] = {
                "method": method, "target": label, "seconds": seconds,
                "sparsity": getattr(res, "achieved_sparsity", None), "layers": len(res.layers),
                "skipped": len(res.skipped), **measure(case, res.proto, folder, f"{method}_{label}")}
            log(f"{case.name} {method} {label}: {done[(method, label)]}")
        result["rows"].append(done[(method, label)])
        cache.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ---------------------------------------------------------------- markdown

def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def table(result: dict) -> list[str]:
    d = result["dense"]
    labelled = d["top1"] is not None
    lines = [f"### {result['name']}", "", result["note"] + ".", "",
             "| method | target | achieved sparsity | " + ("top-1 acc | " if labelled else "")
             + "top-1 agreement | rel. output error | file | compressed | time |",
             "|---|---|---:|" + ("---:|" if labelled else "") + "---:|---:|---:|---:|---:|"]
    acc = (lambda r: f" {_pct(r['top1'])} |") if labelled else (lambda r: "")
    lines.append(f"| dense | - | - |{acc(d)} 100% | 0 | {_mb(d['file_bytes'])} | {_mb(d['compressed_bytes'])} | - |")
    for r in result["rows"]:
        sp = "-" if r["sparsity"] is None else f"{100 * r['sparsity']:.1f}%"
        lines.append(f"| {r['method']} | {r['target']} | {sp} |{acc(r)} {_pct(r['agreement'])} | "
                     f"{r['rel_error']:.4f} | {_mb(r['file_bytes'])} | {_mb(r['compressed_bytes'])} | "
                     f"{r['seconds']:.1f} s |")
    return lines + [""]


def render(results: list[dict], compression: str) -> str:
    cpu = platform.processor() or platform.machine()
    head = [START, "",
            f"Measured {datetime.date.today().isoformat()} by `python tools/bench_sparsity.py` on a {os.cpu_count()}-core "
            f"CPU machine ({cpu}), no GPU; onnxruntime {ort.__version__}, CPUExecutionProvider. "
            f"Compressed = the saved .onnx file {compression}-compressed "
            f"({'level 10' if compression == 'zstd' else 'level 9'}). Sparsity is per layer; "
            "'achieved' counts zeros over the sparsified weight tensors (layers under 128 weights and, for 2:4, "
            "layers whose input channels are not a multiple of 4 are left dense). Time is the wall time of "
            "`sparsify` / `share` alone, calibration included.", ""]
    body = [line for r in results for line in table(r)]
    return "\n".join(head + body + [END])


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else f"# Sparsity and weight sharing\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        text = text.rstrip() + f"\n\n## Measured\n\n{START}\n{END}\n"
    pre, rest = text.split(START, 1)
    post = rest.split(END, 1)[1]
    doc.write_text(pre + block + post)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fmnist", default=str(ROOT / "models/fmnist_resnet.onnx"))
    p.add_argument("--fmnist-calib", default=str(ROOT / "models/fmnist_calib.npz"))
    p.add_argument("--fmnist-test", default=str(ROOT / "models/fmnist_test.npz"))
    p.add_argument("--test-limit", type=int, default=0, help="use only the first N test samples")
    p.add_argument("--zoo", default="/work/zoo/resnet18.onnx")
    p.add_argument("--zoo-calib", type=int, default=32, help="random calibration samples for the zoo model")
    p.add_argument("--zoo-eval", type=int, default=64, help="random evaluation samples for the zoo model")
    p.add_argument("--skip-fmnist", action="store_true")
    p.add_argument("--skip-zoo", action="store_true")
    p.add_argument("--doc", default=str(ROOT / "docs/sparsity.md"))
    p.add_argument("--cache", default=str(ROOT / "out/bench_sparsity"), help="folder for the raw numbers")
    p.add_argument("--reuse", action="store_true", help="also render saved results of models not run now")
    p.add_argument("--resume", action="store_true", help="keep rows already saved for a model; run the rest")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        for case in load_cases(args):
            run_case(case, Path(d), cache / f"{case.name}.json", args.resume,
                     lambda s: print(s, file=sys.stderr, flush=True))
    names = [n for n, skip in (("fmnist_resnet", args.skip_fmnist), (Path(args.zoo).stem, args.skip_zoo))
             if not skip or args.reuse]
    results = [json.loads((cache / f"{n}.json").read_text()) for n in names if (cache / f"{n}.json").exists()]
    write_doc(Path(args.doc), render(results, sparsity.compression_method()))
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
