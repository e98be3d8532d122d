"""``onnxprune sparsify``: zero individual weights (unstructured or N:M) of Conv/Gemm/MatMul layers.

    onnxprune sparsify model.onnx -o sparse.onnx --sparsity 0.7
    onnxprune sparsify model.onnx -o sparse.onnx --sparsity 0.7 --criterion sparsegpt --calib calib.npz
    onnxprune sparsify model.onnx -o sparse24.onnx --pattern 2:4 --criterion wanda --calib calib.npz

Criteria: ``magnitude`` (smallest |W| per layer, or across layers with --global), ``wanda``
(|W| * input norm, per output row) and ``sparsegpt`` (second-order mask choice that updates the
kept weights to compensate); the last two need --calib (an .npz named after the model's inputs,
or ``random``).  ``--pattern N:M`` keeps N of every M weights along the input dimension (input
channels for Conv).  Biases and norms are never touched; tensors under --min-size weights are
skipped; the final classifier is included unless --ignore'd.

A dense ONNX file does not shrink by zeros alone: the report gives the file size and the size
after compression (zstd if the ``zstandard`` package is installed, else gzip).  Fidelity to the
original is measured on --data (default: the calibration data, else 8 random samples), and
accuracy too when that data has ``labels``.

JSON keys (stable; see ``onnxprune.compress.sparsity`` for the per-layer ones): sparsity, pattern,
criterion, global, achieved_sparsity, layers, skipped, file_bytes_before, file_bytes_after,
compressed_bytes_before, compressed_bytes_after, compression, calibration, data, fidelity,
accuracy, reference_accuracy.
"""

from __future__ import annotations

import argparse
import sys

from .. import ir
from ..compress import sparsity
from ..compress.report import save_and_measure
from ..data import ArrayData, open_data
from . import fmt, options


def register(sub) -> None:
    p = sub.add_parser("sparsify", help="zero individual weights (unstructured or N:M sparsity)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p)
    p.add_argument("--sparsity", metavar="S", help="fraction of weights to zero per layer, in [0, 1)")
    p.add_argument("--pattern", metavar="N:M", help="keep N of every M weights along the input dimension, e.g. 2:4")
    p.add_argument("--criterion", choices=sparsity.CRITERIA, default="magnitude",
                   help="which weights to zero (default magnitude)")
    p.add_argument("--global", dest="global_scope", action="store_true",
                   help="one magnitude threshold across all layers instead of per layer")
    p.add_argument("--calib", metavar="DATA", help="calibration .npz, image folder or 'random' for wanda and "
                                                   "sparsegpt")
    p.add_argument("--calib-samples", type=int, default=128, metavar="N",
                   help="calibration samples used (default 128)")
    p.add_argument("--one-pass", action="store_true",
                   help="calibrate every layer on the original model's activations (faster) instead of "
                        "layer by layer on the already sparsified upstream layers")
    p.add_argument("--damp", type=float, default=0.01, help="sparsegpt damping, fraction of mean diag(H)")
    p.add_argument("--blocksize", type=int, default=128, help="sparsegpt column block size (default 128)")
    options.add_selection(p)
    options.add_fidelity_report(p, "sparsity report")
    p.set_defaults(func=run)


def parse_options(args: argparse.Namespace) -> sparsity.Options:
    s = None if args.sparsity is None else options.fraction("--sparsity", args.sparsity)
    pattern = None if args.pattern is None else sparsity.Pattern.parse(args.pattern)
    opts = sparsity.Options(sparsity=s, pattern=pattern, criterion=args.criterion, global_scope=args.global_scope,
                            ignore=tuple(args.ignore), min_size=args.min_size, sequential=not args.one_pass,
                            blocksize=args.blocksize, damp=args.damp, calib_samples=args.calib_samples)
    sparsity.require_calibration(opts, args.calib is not None)
    return opts


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "calib", "data")
    json_out = options.json_path(args)
    out = options.output_path(args)
    opts = parse_options(args)
    shapes = options.input_shapes(args)
    model = ir.load(args.model)
    calib = open_data(args.calib, model.proto, shapes, opts.calib_samples) if args.calib else None
    result = sparsity.sparsify(model.proto, opts, calib, progress=fmt.progress)
    saved = save_and_measure(model, result.proto, out, _fidelity_data(args, model, shapes, calib), shapes)
    report = result.report(saved, None if calib is None else (calib.source or calib.kind))
    fmt.table(f"{opts.criterion} sparsity {opts.target:.0%}" + (f", pattern {opts.pattern}" if opts.pattern else ""),
              ["layer", "shape", "sparsity", "weight err", "output err", "note"],
              [[lr.name, "x".join(map(str, lr.shape)), f"{lr.sparsity:.1%}", f"{lr.weight_error:.4f}",
                "-" if lr.output_error is None else f"{lr.output_error:.4f}", lr.note] for lr in result.layers],
              right=(2, 3, 4))
    fmt.skipped(result.skipped)
    fmt.out.print(f"sparsity over {len(result.layers)} layers: {result.achieved_sparsity:.1%}", soft_wrap=True)
    fmt.compression_totals(report)
    lost = loss_note(report, opts)
    if lost:
        print(lost, file=sys.stderr)
    if json_out:
        fmt.write_json(json_out, report)
    return 0


def loss_note(report: dict, opts: sparsity.Options) -> str | None:
    """One line when the zeros cost more than a point of accuracy (or of agreement with the original, without
    labels) on the measured data, with the repair that exists."""
    acc, ref = report.get("accuracy"), report.get("reference_accuracy")
    if acc and ref:
        what, before, after = "top-1 accuracy", ref["top1"], acc["top1"]
    else:
        agree = [f["top1_agreement"] for f in (report.get("fidelity") or {}).values()
                 if f.get("top1_agreement") is not None]
        if not agree:
            return None
        what, before, after = "top-1 agreement with the original", 1.0, min(agree)
    if before - after <= 0.01:
        return None
    repair = ("--criterion sparsegpt --calib DATA (it updates the kept weights to compensate)"
              if opts.criterion != "sparsegpt" else "more --calib samples (--calib-samples)")
    return (f"note: the zeros cost {100 * (before - after):.2f} points of {what} on {report['data']} "
            f"({100 * before:.2f}% -> {100 * after:.2f}%); to lose less, try {repair}, or a lower "
            + ("--sparsity" if opts.pattern is None else "sparsity than the pattern's"))


def _fidelity_data(args: argparse.Namespace, model: ir.Model, shapes: dict[str, list[int]],
                   fallback: ArrayData | None) -> ArrayData:
    """``--data``, else the calibration data, else 8 random samples."""
    if args.data:
        return open_data(args.data, model.proto, shapes, 8)
    return fallback if fallback is not None else open_data("random", model.proto, shapes, 8)
