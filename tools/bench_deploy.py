"""prune -> reconstruct -> quantize -> convert, measured where the models run: writes docs/deploy.json
(docs/deploy.md carries the tables and the prose).

    nice python tools/bench_deploy.py [--zoo /work/scratch/material/zoo/static] [--work DIR] [--runs 40]

For the shipped Fashion-MNIST model and three zoo CNNs (ResNet-50, MobileNetV2, EfficientNet-B0 from
tools/export_zoo.py, random weights): the whole chain runs from the CLI (``onnxprune prune --target-macs
0.5`` with least-squares reconstruction from --calib where real data exists, then ``onnxprune quantize``
on the original and on the pruned model, static QDQ INT8 per channel, ``--ort``), then four variants
(original, pruned, quantized, pruned + quantized) are measured: file size, MACs, accuracy on the
10,000 test images (Fashion-MNIST) or top-1 agreement with the original on random inputs (zoo), and
p50 latency (batch 1, default threads) in onnxruntime CPU and in OpenVINO CPU (float32 precision),
the four variants interleaved run by run in one benchmark per runtime. The 1-minute load average is
recorded around every benchmark. Existing outputs in --work are reused (delete them to redo a step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from onnxprune import ir, runtime
from onnxprune.data import open_data, random_data
from onnxprune.measure import counts, latency, quality

ROOT = Path(__file__).resolve().parents[1]
ZOO = ["resnet50", "mobilenet_v2", "efficientnet_b0"]


def cli(*args) -> None:
    cmd = [sys.executable, "-m", "onnxprune", *map(str, args)]
    print("+ onnxprune " + " ".join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def load1() -> float:
    return os.getloadavg()[0]


def chain(name: str, model: Path, work: Path, calib: Path, real: bool) -> dict[str, Path]:
    """The CLI chain; returns the four variants' paths."""
    pruned, q, pq = work / f"{name}.pruned.onnx", work / f"{name}.int8.onnx", work / f"{name}.pruned.int8.onnx"
    if not pruned.exists():
        extra = ["--calib", calib] if real else []
        cli("prune", model, "-o", pruned, "--target-macs", "0.5", *extra, "--report", work / f"{name}.prune.json")
    for src, dst in ((model, q), (pruned, pq)):
        if not dst.exists():
            cli("quantize", src, "-o", dst, "--calib", calib, "--bench-runs", "0", "--ort",
                "--json", work / f"{dst.stem}.json")
    return {"original": model, "pruned": pruned, "quantized": q, "pruned+quantized": pq}


def measure(name: str, paths: dict[str, Path], data, runs: int, labels: bool) -> dict:
    protos = {k: ir.load(p).proto for k, p in paths.items()}
    rows = {k: {"file_bytes": p.stat().st_size} for k, p in paths.items()}
    for k in ("original", "pruned"):
        rows[k]["macs"] = counts.summarize(protos[k], {}).macs
    rows["quantized"]["macs"], rows["pruned+quantized"]["macs"] = rows["original"]["macs"], rows["pruned"]["macs"]
    for k, proto in protos.items():
        m = quality.compare(proto, data, protos["original"], batch_size=32, output=None, want_accuracy=labels)
        rows[k]["accuracy"] = m.accuracy["top1"] if labels else None
        f = next(iter(m.fidelity.values()))
        rows[k]["agreement"], rows[k]["cosine"] = f["top1_agreement"], f["cosine"]
    ort_file = paths["pruned+quantized"].with_suffix(".ort")
    rows["pruned+quantized"]["ort_bytes"] = ort_file.stat().st_size if ort_file.exists() else None
    for rt in ("onnxruntime", "openvino"):
        before = load1()
        with runtime.use(runtime.Target(runtime=rt)):
            bench = latency.benchmark(protos, warmup=5, runs=runs)
        after = load1()
        for k, st in bench.items():
            rows[k][f"{rt}_p50_ms"] = st.p50
        rows["_load"] = {**rows.get("_load", {}), rt: [round(before, 2), round(after, 2)]}
    load = rows.pop("_load")
    out = {"model": name, "variants": rows, "load_1min": load}
    o, p = rows["original"], rows["pruned"]
    out["macs_ratio"] = p["macs"] / o["macs"]
    for rt in ("onnxruntime", "openvino"):
        lr = p[f"{rt}_p50_ms"] / o[f"{rt}_p50_ms"]
        out[f"{rt}_latency_ratio"] = lr
        out[f"{rt}_within_1.15x_macs"] = lr <= 1.15 * out["macs_ratio"]
        out[f"{rt}_not_slower"] = lr <= 1.0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="/work/scratch/material/zoo/static")
    ap.add_argument("--work", default="/work/scratch/deploy/bench")
    ap.add_argument("--models", nargs="*", default=["fmnist", *ZOO])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "docs" / "deploy.json"))
    ap.add_argument("--md", default=str(ROOT / "docs" / "deploy.md"), help="tables written here ('' = none)")
    ap.add_argument("--notes", help="a Markdown file appended to --md (the prose about the measured numbers)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(Path(a.out).read_text()) if Path(a.out).exists() else {}
    results.setdefault("models", {})
    for name in a.models:
        t = time.time()
        if name == "fmnist":
            model, calib = ROOT / "models" / "fmnist_resnet.onnx", ROOT / "models" / "fmnist_calib.npz"
            paths = chain(name, model, work, calib, real=True)
            data = open_data(str(ROOT / "models" / "fmnist_test.npz"), ir.load(model).proto, {})
            res = measure(name, paths, data, a.runs, labels=True)
        else:
            model = Path(a.zoo) / f"{name}.onnx"
            proto = ir.load(model).proto
            calib = work / f"{name}.calib.npz"
            if not calib.exists():  # random-weight models: random inputs stand in for images
                np.savez(calib, **random_data(proto, ir.resolve_input_shapes(proto, {}), num_samples=32).arrays)
            paths = chain(name, model, work, calib, real=False)
            data = random_data(proto, ir.resolve_input_shapes(proto, {}), num_samples=64)
            res = measure(name, paths, data, a.runs, labels=False)
        res["seconds"] = round(time.time() - t, 1)
        results["models"][name] = res
        results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "avx512": latency.cpu_features().get("AVX512F", False),
                              "onnxruntime": runtime.version(), "openvino": _ov_version(),
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
        print(json.dumps({k: v for k, v in res.items() if k != "variants"}), flush=True)
    if a.md and results["models"]:   # --models with no name: the tables again from the JSON
        Path(a.md).write_text(render(results) + (Path(a.notes).read_text() if a.notes else ""))


HEADER = """# Deployment: prune -> reconstruct -> quantize -> convert, measured where the models run

Written by `tools/bench_deploy.py` (the tables; the numbers are in [deploy.json](deploy.json)). Every step runs
from the CLI: `onnxprune prune MODEL -o P --target-macs 0.5 [--calib D]` (least-squares reconstruction with real
calibration data), `onnxprune quantize {MODEL,P} -o Q --calib D --ort` (static QDQ INT8, per-channel weights,
MinMax ranges; the `.ort` file beside each INT8 model is loaded and checked against it), then the four variants
are measured. Latency: p50 of one `run` at batch 1 with the runtime's default threads, the four variants
interleaved run by run in one benchmark per runtime (onnxruntime CPUExecutionProvider; OpenVINO CPU plugin at
float32 inference precision); the 1-minute load average before and after each benchmark is given, and this
2-core machine was shared with other jobs, so ratios are the numbers to read, not milliseconds.
The zoo models carry random weights (tools/export_zoo.py): their quality column is the mean cosine similarity of
the logits to the original's on 64 random inputs (top-1 agreement means little for random weights, whose argmax is
nearly constant; it is in deploy.json), not accuracy; their calibration data are 32 random inputs.
"""


def render(results: dict) -> str:
    m = results["machine"]
    lines = [HEADER, f"Machine: {m['cores']} cores ({m['cpu']}, AVX-512: {m['avx512']}), onnxruntime {m['onnxruntime']}, "
             f"OpenVINO {m['openvino']}, {m['date']}.", ""]
    for name, r in results["models"].items():
        v = r["variants"]
        q = "top-1 accuracy" if v["original"]["accuracy"] is not None else "cosine to original"
        lines += [f"## {name}", "", f"| variant | file | MACs | {q} | onnxruntime p50 | OpenVINO p50 |",
                  "|---|---:|---:|---:|---:|---:|"]
        o = v["original"]
        for k, row in v.items():
            qual = f"{100 * row['accuracy']:.2f}%" if row["accuracy"] is not None else f"{row['cosine']:.4f}"
            lines.append(f"| {k} | {row['file_bytes'] / 1e6:.2f} MB | {row['macs'] / 1e6:.1f}M ({row['macs'] / o['macs']:.2f}x) "
                         f"| {qual} | {row['onnxruntime_p50_ms']:.2f} ms ({row['onnxruntime_p50_ms'] / o['onnxruntime_p50_ms']:.2f}x) "
                         f"| {row['openvino_p50_ms']:.2f} ms ({row['openvino_p50_ms'] / o['openvino_p50_ms']:.2f}x) |")
        ld = r["load_1min"]
        lines += ["", f"Pruned: MACs ratio {r['macs_ratio']:.3f}; latency ratio {r['onnxruntime_latency_ratio']:.3f} in "
                  f"onnxruntime (within 1.15x of MACs: {r['onnxruntime_within_1.15x_macs']}, not slower: "
                  f"{r['onnxruntime_not_slower']}), {r['openvino_latency_ratio']:.3f} in OpenVINO (within 1.15x: "
                  f"{r['openvino_within_1.15x_macs']}, not slower: {r['openvino_not_slower']}). Load (1 min) "
                  f"onnxruntime {ld['onnxruntime'][0]}-{ld['onnxruntime'][1]}, OpenVINO {ld['openvino'][0]}-{ld['openvino'][1]}; "
                  f"{r['seconds']:.0f} s for the row.", ""]
    return "\n".join(lines) + "\n"


def _ov_version() -> str | None:
    from onnxprune.runtime import openvino
    return openvino.version()


if __name__ == "__main__":
    main()
