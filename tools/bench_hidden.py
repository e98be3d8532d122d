"""Hidden-width slicing measured on real transformers: perplexity (causal LMs) or embedding cosine (MiniLM).

    python tools/bench_hidden.py smollm2 --model M.onnx --calib calib.npz --eval eval.npz --keep 0.9 0.8
    python tools/bench_hidden.py minilm --model M.onnx --calib calib.npz --eval eval.npz \
        --reference eval_reference.npz --target-params 0.7 0.5

Each point runs ``onnxprune prune --slice-hidden`` as a user would (a subprocess, timed), then measures the
saved model: held-out perplexity, or the mean cosine of mask-weighted mean-pooled ``last_hidden_state`` to
the reference sentence embeddings. Results go to a JSON file (``--out``) and are printed; the load
(``uptime``) is recorded with each run. Material: ``tools/export_smollm2.py``, ``tools/export_minilm.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxprune import runtime  # noqa: E402
from onnxprune.measure import perplexity as ppl  # noqa: E402


def load() -> float:
    return os.getloadavg()[0]


def pooled(model: str, data: dict, batch: int = 32) -> np.ndarray:
    sess = runtime.session(__import__("onnx").load(model))
    names = [i.name for i in sess.inputs]
    out = []
    for s in range(0, len(data["input_ids"]), batch):
        feed = {k: data[k][s:s + batch] for k in names}
        h = sess.run(["last_hidden_state"], feed)[0]
        m = feed["attention_mask"][..., None].astype(np.float32)
        out.append((h * m).sum(1) / np.maximum(m.sum(1), 1e-9))
    return np.concatenate(out)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def prune(model: str, out: str, calib: str, extra: list[str], report: str) -> tuple[float, dict]:
    cmd = [sys.executable, "-m", "onnxprune", "prune", model, "-o", out, "--slice-hidden", "--calib", calib,
           "--report", report, *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return secs, json.loads(Path(report).read_text())


def curve(args) -> None:
    """One calibration pass, then every width of ``--keep`` sliced from it and measured (the Python API)."""
    import onnx

    from onnxprune import hidden
    from onnxprune.hidden import slicing
    from onnxprune.measure import counts
    from onnxprune.pipeline import calib_data

    t0 = time.perf_counter()
    model = onnx.load(args.model)
    base = counts.summarize(model).params
    prep = slicing.drop_noop_casts(slicing.name_nodes(model))
    stream = hidden.find_stream(prep)
    calib = calib_data(args.calib, model, {})
    t = time.perf_counter()
    cov = slicing.covariance(prep, stream, calib, batch_size=8, limit=args.calib_limit)
    cov_s = time.perf_counter() - t
    print(f"calibration statistics: {cov_s:.0f} s (load {load():.1f})", flush=True)
    rows = []
    evald = dict(np.load(args.eval))
    if args.kind == "smollm2":
        ev = ppl.token_data(args.eval, model)
        dense = None if args.no_dense else ppl.perplexity(model, ev, limit=args.limit)["perplexity"]
    else:
        ref = np.load(args.reference)["embeddings"]
    for i, k in enumerate(args.keep):
        t = time.perf_counter()
        h = hidden.slice_hidden(prep, calib, keep=k, cov=cov, verify=i == 0, round_to=args.round_to,
                                refit_ls=args.refit)
        secs = time.perf_counter() - t
        n = counts.summarize(h.proto).params
        row = {"keep": k, "width": h.width_after, "eval_limit": args.limit, "calib_limit": args.calib_limit, "params": n, "params_kept_onnx": n / base,
               "slice_seconds": round(secs, 1), "calib_seconds": round(cov_s, 1), "load": round(load(), 1),
               "variance_kept": h.variance_kept, "refit": h.refit, "rotation_verified": None if h.rotation is None else
               bool(h.rotation.passed)}
        if args.tied_params:
            row["params_kept"] = n / args.tied_params
        if args.kind == "smollm2":
            p = ppl.perplexity(h.proto, ev, limit=args.limit)
            row.update(perplexity=p["perplexity"], tokens=p["tokens"], dense_perplexity=dense,
                       ratio=None if dense is None else p["perplexity"] / dense)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                onnx.save(h.proto, os.path.join(tmp, "s.onnx"))
                c = cosine(pooled(os.path.join(tmp, "s.onnx"), evald), ref)
            row.update(mean_cosine=float(c.mean()), min_cosine=float(c.min()))
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = ROOT / args.out
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault(f"{args.kind}_curve" + ("_refit" if args.refit else ""), []).extend(rows)
    old[f"{args.kind}_curve_seconds"] = round(time.perf_counter() - t0, 1)
    path.write_text(json.dumps(old, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["smollm2", "minilm"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--eval", required=True)
    ap.add_argument("--reference", help="minilm: reference embeddings of --eval (npz 'embeddings')")
    ap.add_argument("--keep", type=float, nargs="*", default=[], help="hidden widths kept (fractions)")
    ap.add_argument("--target-params", type=float, nargs="*", default=[])
    ap.add_argument("--extra", default="", help="more prune flags, space separated")
    ap.add_argument("--out", default="docs/bench_hidden.json")
    ap.add_argument("--curve", action="store_true", help="one calibration pass, every --keep from it (API)")
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--refit", action="store_true", help="curve: least-squares refit of the sliced norms' maps")
    ap.add_argument("--limit", type=int, help="evaluate the first N sequences only")
    ap.add_argument("--calib-limit", type=int, help="curve: calibrate on the first N sequences only")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense model's perplexity")
    ap.add_argument("--tied-params", type=int, help="the model's parameter count with tied tables counted once")
    args = ap.parse_args()
    if args.curve:
        return curve(args)
    rows = []
    evald = dict(np.load(args.eval))
    if args.kind == "smollm2":
        import onnx
        base = ppl.perplexity(onnx.load(args.model), ppl.token_data(args.eval, onnx.load(args.model)))
        print(f"dense perplexity {base['perplexity']:.3f} on {base['tokens']} tokens", flush=True)
    else:
        ref = np.load(args.reference)["embeddings"]
        dense_cos = float(cosine(pooled(args.model, evald), ref).mean())
        print(f"dense: mean cosine of the ONNX model to the reference {dense_cos:.6f}", flush=True)
    points = [("--hidden-keep", k) for k in args.keep] + [("--target-params", t) for t in args.target_params]
    with tempfile.TemporaryDirectory() as tmp:
        for flag, v in points:
            out, rep = os.path.join(tmp, "s.onnx"), os.path.join(tmp, "r.json")
            before = load()
            secs, r = prune(args.model, out, args.calib, [flag, str(v), *args.extra.split()], rep)
            row = {"flag": flag, "value": v, "extra": args.extra, "prune_seconds": round(secs, 1),
                   "load_before": round(before, 2), "load_after": round(load(), 2),
                   "params_before": r["params_before"], "params_after": r["params_after"],
                   "params_kept": r["params_after"] / r["params_before"],
                   "macs_kept": r["macs_after"] / max(r["macs_before"], 1),
                   "width": [r["hidden"]["width_before"], r["hidden"]["width_after"]],
                   "rotation_verified": r["hidden"]["rotation_verified"],
                   "variance_kept": r["hidden"]["variance_kept"], "peak_rss_mb": r.get("peak_rss_mb")}
            if args.kind == "smollm2":
                import onnx
                m = onnx.load(out)
                p = ppl.perplexity(m, ppl.token_data(args.eval, m))
                row.update(perplexity=p["perplexity"], dense_perplexity=base["perplexity"],
                           ratio=p["perplexity"] / base["perplexity"])
            else:
                c = cosine(pooled(out, evald), ref)
                row.update(mean_cosine=float(c.mean()), min_cosine=float(c.min()), dense_cosine=dense_cos)
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = ROOT / args.out
    old = json.loads(path.read_text()) if path.exists() else {}
    old.setdefault(args.kind, [])
    old[args.kind] = [o for o in old[args.kind] if (o["flag"], o["value"], o.get("extra", "")) not in
                      {(r["flag"], r["value"], r["extra"]) for r in rows}] + rows
    path.write_text(json.dumps(old, indent=1) + "\n")


if __name__ == "__main__":
    main()
