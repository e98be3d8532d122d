"""Prune a model over 2 GB end to end and record peak memory and time in docs/reliability.md.

    python tools/bench_large_model.py                    # 9 x MatMul 8192x8192 (2.4 GB), ratio 0.5
    python tools/bench_large_model.py --layers 2 --width 512 --no-doc   # a quick dry run of the same path

The model is a stack of wide MatMul + bias + Relu layers written straight to an
external data file, one weight at a time (generating it never holds more than
one layer in memory). ``onnxprune prune`` runs on it as a subprocess; its peak
resident memory comes from ``getrusage(RUSAGE_CHILDREN)`` (the only child this
tool waits for) and its wall time from the clock. The output must be written
with external data, load from its path in onnxruntime and give outputs of the
right shape. The generated files live in a temporary folder that is removed at
the end (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- large-model:begin -->", "<!-- large-model:end -->"


def _external(name: str, shape: list[int], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name, t.data_type = name, TensorProto.FLOAT
    t.dims.extend(shape)
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def generate(path: Path, layers: int, width: int, seed: int = 0) -> int:
    """Write ``layers`` x (MatMul width x width, Add bias, Relu) with all weights in ``path``.data.

    Returns the size in bytes of model file plus data file.
    """
    rng = np.random.default_rng(seed)
    data = path.with_name(path.name + ".data")
    inits, nodes, x = [], [], "x"
    with open(data, "wb") as fh:
        for i in range(layers):
            for name, shape in ((f"w{i}", [width, width]), (f"b{i}", [width])):
                arr = rng.standard_normal(shape, dtype=np.float32)
                arr *= (1.0 / np.sqrt(width)) if name[0] == "w" else 0.1
                offset = fh.tell()
                fh.write(arr.tobytes())
                inits.append(_external(name, shape, data.name, offset, arr.nbytes))
                del arr
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add{i}")]
            if i < layers - 1:
                nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"relu{i}"))
                x = f"relu{i}"
    graph = helper.make_graph(nodes, "wide_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
                              [helper.make_tensor_value_info(f"add{layers - 1}", TensorProto.FLOAT, [1, width])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench_large_model")
    model.ir_version = 8
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    onnx.checker.check_model(str(path))
    return path.stat().st_size + data.stat().st_size


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def run_prune(model: Path, out: Path, report: Path, ratio: float) -> dict:
    """``onnxprune prune`` in a subprocess: exit code, wall seconds, peak RSS of the child in bytes."""
    env = dict(os.environ, ONNXPRUNE_NO_PROGRESS="1")
    cmd = [sys.executable, "-m", "onnxprune", "prune", str(model), "-o", str(out), "--ratio", str(ratio),
           "--report", str(report)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kilobytes on Linux
    return {"code": proc.returncode, "seconds": seconds, "peak_rss": peak_kb * 1024, "stderr": proc.stderr,
            "stdout": proc.stdout}


def check_output(out: Path, width: int) -> dict:
    """The pruned model has external data, loads from its path in onnxruntime and runs."""
    import onnxruntime as ort

    data = out.with_name(out.name + ".data")
    header = onnx.load(str(out), load_external_data=False)
    external = sum(1 for t in header.graph.initializer if t.data_location == TensorProto.EXTERNAL)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.random.default_rng(1).standard_normal((1, width), dtype=np.float32)})[0]
    return {"external_tensors": external, "data_file": data.exists(), "output_shape": list(y.shape),
            "finite": bool(np.isfinite(y).all()), "bytes": out.stat().st_size + (data.stat().st_size if data.exists()
                                                                               else 0)}


def markdown(r: dict) -> str:
    gb = 2 ** 30
    return "\n".join([
        BEGIN,
        f"Measured {r['date']} on {r['machine']} with `python tools/bench_large_model.py "
        f"--layers {r['layers']} --width {r['width']} --ratio {r['ratio']}`:",
        "",
        "| | |",
        "|---|---:|",
        f"| model | {r['layers']} x MatMul {r['width']}x{r['width']} float32 + bias + Relu, external data |",
        f"| model size (model + .data) | {r['model_bytes'] / gb:.2f} GiB |",
        f"| pruned size (model + .data) | {r['output']['bytes'] / gb:.2f} GiB, "
        f"{r['output']['external_tensors']} tensors external |",
        f"| peak RSS of `onnxprune prune` | {r['peak_rss'] / gb:.2f} GiB "
        f"({r['peak_rss'] / r['model_bytes']:.2f} x model size) |",
        f"| peak RSS at the end of each stage (MB) | "
        f"{', '.join(f'{k} {v}' for k, v in (r.get('stage_peak_mb') or {}).items())} |",
        f"| wall time (load average {r.get('load', 0):.1f}) | {r['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f}' for k, v in (r.get('stage_seconds') or {}).items() if v >= 0.5)}) |",
        f"| verified against the masked original | {r['verified']} |",
        f"| output loads and runs in onnxruntime (from its path) | {r['output']['finite']} |",
        END,
    ])


def write_doc(text: str, doc: Path = DOC) -> None:
    old = doc.read_text() if doc.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + text + rest.split(END, 1)[1]
    else:
        new = old.rstrip() + "\n\n" + text + "\n"
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--dir", default=None, help="where to generate the model (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--no-doc", action="store_true", help="print the results only")
    args = ap.parse_args(argv)

    need = 4 * args.layers * (args.width + 1) * args.width * 2.2
    base = Path(args.dir) if args.dir else Path(tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"need about {need / 2**30:.1f} GiB free in {base}, have {free / 2**30:.1f} GiB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="onnxprune_large_", dir=base))
    try:
        model, out = work / "big.onnx", work / "out" / "big_pruned.onnx"
        out.parent.mkdir()
        t = time.perf_counter()
        size = generate(model, args.layers, args.width)
        print(f"generated {size / 2**30:.2f} GiB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        res = run_prune(model, out, work / "report.json", args.ratio)
        if res["code"] != 0:
            print(res["stdout"] + res["stderr"], file=sys.stderr)
            print(f"onnxprune prune failed with exit {res['code']} (peak RSS {res['peak_rss'] / 2**30:.2f} GiB, "
                  f"{res['seconds']:.0f} s)", file=sys.stderr)
            return 1
        report = json.loads((work / "report.json").read_text())
        leftovers = sorted(p.name for p in out.parent.iterdir() if p.name not in (out.name, out.name + ".data"))
        r = {"date": dt.date.today().isoformat(), "machine": f"{os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, {platform.machine()}",
             "layers": args.layers, "width": args.width, "ratio": args.ratio, "model_bytes": size,
             "seconds": res["seconds"], "peak_rss": res["peak_rss"], "verified": report["verified"],
             "stage_seconds": report.get("seconds"), "stage_peak_mb": report.get("peak_rss_mb"),
             "load": os.getloadavg()[0], "output": check_output(out, args.width),
             "leftover_files": leftovers}
        print(json.dumps(r, indent=2))
        if not args.no_doc:
            write_doc(markdown(r))
        ok = r["output"]["data_file"] and r["output"]["external_tensors"] > 0 and r["output"]["finite"] \
            and r["output"]["output_shape"] == [1, args.width] and not leftovers and r["verified"]
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
