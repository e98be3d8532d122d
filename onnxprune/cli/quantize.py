"""onnxprune quantize: INT8 through onnxruntime's quantizer, measured before and after.

    onnxprune quantize pruned.onnx -o pruned.int8.onnx --calib calib.npz --data test.npz --reference model.onnx

Static QDQ INT8 (the default): weights per channel, activation ranges calibrated on --calib (an
.npz named after the model inputs or a folder of images, read like every other data flag).
--dynamic: weights INT8 and activations quantized at run time, no data needed; for MatMul-heavy
transformers. Quantization is approximate: with --data the report measures the INT8 model against
the float one (accuracy with labels, else fidelity) and, with --reference (the original a pruned
model came from), against the original: the whole chain's loss. Latency of every model is timed
interleaved on --runtime.

JSON keys (stable)::

    model, output         the float model and the INT8 model written
    quantization          {"method": static|dynamic, "format", "weights", "activations", "per_channel",
                           "calibration", "calib_samples", "calib_data", "preparation", "quantizer"}
    file_bytes_before, file_bytes_after
    measured              {"accuracy", "accuracy_float", "accuracy_original", "points_vs_float",
                           "points_vs_original", "fidelity_to_float", "fidelity_to_original",
                           "latency": {"runtime", "provider", "threads", "batch_size", "p50_ms": {...},
                           "ratio_to_float", "ratio_to_original"}, "exact": false, "note"}
    formats               what each written file contains (with --ort, the .ort file and its check)
    runtime               where models ran (see 'onnxprune prune --help')
"""

from __future__ import annotations

import argparse
import sys

from .. import ir, runtime
from ..compress import quantize as quant
from ..runtime import ortformat
from ..data import open_data
from ..errors import OnnxPruneError
from . import fmt, options


def register(sub) -> None:
    p = sub.add_parser("quantize", help="INT8 through onnxruntime's quantizer, measured before and after",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p)
    options.add_quantize(p)
    p.add_argument("--data", metavar="DATA", help="held-out data (.npz or image folder, labels optional) to "
                                                  "measure accuracy or fidelity and latency on")
    p.add_argument("--reference", metavar="ORIG", help="the original model (before pruning): the INT8 model is "
                                                       "also measured against it")
    p.add_argument("--bench-runs", type=int, default=20, metavar="N",
                   help="timed runs per model for the latency row (0 = skip)")
    options.add_ort(p)
    options.add_input_shapes(p)
    options.add_json(p, "report")
    options.add_runtime(p)
    options.add_images(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "calib", "data")
    json_out = options.json_path(args)
    if args.bench_runs < 0:
        raise OnnxPruneError(f"--bench-runs {args.bench_runs}: must be 0 or more")
    shapes = options.input_shapes(args)
    model = ir.load(args.model)
    ir.materialize(model)
    if args.calib and args.dynamic:
        raise OnnxPruneError("--dynamic takes no --calib (activation ranges are computed at run time)")
    calib = open_data(args.calib, model.proto, shapes) if args.calib else None
    q, how = quant.quantize(model.proto, calib, dynamic=args.dynamic, per_channel=not args.per_tensor,
                            samples=args.calib_samples)
    data = open_data(args.data, model.proto, shapes) if args.data else None
    original = ir.load(args.reference).proto if args.reference else None
    measured = quant.measure(q, model.proto, data, original=original, bench_runs=args.bench_runs,
                             input_shapes=shapes)
    size = ir.save(q, args.output, source=model.path)
    report = {"model": args.model, "output": args.output, "quantization": how,
              "file_bytes_before": model.file_bytes, "file_bytes_after": size, "measured": measured,
              "formats": ortformat.formats(args.output, size, q, args.ort, shapes), "runtime": runtime.current().to_json()}
    print_report(report)
    if json_out:
        fmt.write_json(json_out, report)
    return 0


def print_report(rep: dict) -> None:
    m, how = rep["measured"], rep["quantization"]
    fmt.out.print(f"{how['method']} INT8 ({how.get('format', 'QOperator')}, weights per "
                  f"{'channel' if how['per_channel'] else 'tensor'}) -> {rep['output']}", soft_wrap=True)
    cols = ["", "int8", "float"] + (["original"] if "accuracy_original" in m or "fidelity_to_original" in m
                                    or "original" in m.get("latency", {}).get("p50_ms", {}) else [])
    rows = [["file size", fmt.human_bytes(rep["file_bytes_after"]), fmt.human_bytes(rep["file_bytes_before"])]
            + ([""] if len(cols) == 4 else [])]
    if m.get("accuracy"):
        rows.append(["top-1", f"{100 * m['accuracy']['top1']:.2f}%"] +
                    [f"{100 * m[f'accuracy_{n}']['top1']:.2f}%" for n in cols[2:]])
    for name in cols[2:]:
        for out, f in (m.get(f"fidelity_to_{name}") or {}).items():
            if f.get("top1_agreement") is not None:
                rows.append([f"agreement with {name} ({out})", f"{100 * f['top1_agreement']:.2f}%"] +
                            ["" for _ in cols[2:]])
    lat = m.get("latency")
    if lat:
        rows.append([f"latency p50 ({lat['runtime']})"] + [f"{lat['p50_ms'][n]:.3f} ms" for n in cols[1:]])
    fmt.table(None, cols, rows, right=range(1, len(cols)))
    if "ort" in rep.get("formats", {}):
        o = rep["formats"]["ort"]
        fmt.out.print(f"ORT format: {o['path']} ({fmt.human_bytes(o['bytes'])}), loads and matches the .onnx")
    print(f"note: {m['note']}", file=sys.stderr)
