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

JSON keys (stable; see ``onnxprune.sparsity`` for the per-layer ones): sparsity, pattern,
criterion, global, achieved_sparsity, layers, skipped, file_bytes_before, file_bytes_after,
compressed_bytes_before, compressed_bytes_after, compression, calibration, data, fidelity,
accuracy, reference_accuracy.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import ir
from ..compress import sparsity
from ..data import ArrayData, open_data
from ..measure import quality
from ..errors import OnnxPruneError
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
    add_selection(p)
    add_report(p, "sparsity report")
    p.set_defaults(func=run)


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="leave this layer (node name) or weight tensor alone (repeatable)")
    p.add_argument("--min-size", type=int, default=sparsity.MIN_SIZE, metavar="N",
                   help=f"skip weight tensors with fewer elements (default {sparsity.MIN_SIZE}; 0 = all)")


def add_report(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", metavar="DATA", help="data to measure fidelity (and accuracy, with labels) on: "
                                                  ".npz, image folder or 'random'")
    options.add_input_shapes(p)
    options.add_json(p, what)
    options.add_runtime(p)
    options.add_images(p)


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
    check_output(args)
    opts = parse_options(args)
    shapes = options.input_shapes(args)
    model = ir.load(args.model)
    calib = open_data(args.calib, model.proto, shapes, opts.calib_samples) if args.calib else None
    result = sparsity.sparsify(model.proto, opts, calib, progress=fmt.progress)
    report = finish(model, result.proto, args, shapes, calib)
    report = {
        "sparsity": opts.target, "pattern": None if opts.pattern is None else str(opts.pattern),
        "criterion": opts.criterion, "global": opts.global_scope,
        "achieved_sparsity": result.achieved_sparsity,
        "layers": [lr.as_dict() for lr in result.layers], "skipped": result.skipped,
        "calibration": None if calib is None else (calib.source or calib.kind), **report,
    }
    fmt.table(f"{opts.criterion} sparsity {opts.target:.0%}" + (f", pattern {opts.pattern}" if opts.pattern else ""),
              ["layer", "shape", "sparsity", "weight err", "output err", "note"],
              [[lr.name, "x".join(map(str, lr.shape)), f"{lr.sparsity:.1%}", f"{lr.weight_error:.4f}",
                "-" if lr.output_error is None else f"{lr.output_error:.4f}", lr.note] for lr in result.layers],
              right=(2, 3, 4))
    print_skipped(result.skipped)
    fmt.out.print(f"sparsity over {len(result.layers)} layers: {result.achieved_sparsity:.1%}", soft_wrap=True)
    print_totals(report)
    if json_out:
        fmt.write_json(json_out, report)
    return 0


# ---------------------------------------------------------------- shared with ``share``

def check_output(args: argparse.Namespace) -> None:
    """Fail before the work, not after it, when ``-o`` cannot be written (``ir.save`` checks again)."""
    out = Path(args.output)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OnnxPruneError(f"-o {out}: is a directory; give a file path such as {out / 'model.onnx'}")
    if not parent.is_dir():
        raise OnnxPruneError(f"-o {out}: folder {parent} does not exist; create it first")
    if out.exists() and Path(args.model).exists() and os.path.samefile(out, args.model):
        raise OnnxPruneError(f"-o {out}: is the input model; choose another output path")


def finish(model: ir.Model, proto, args: argparse.Namespace, shapes: dict[str, list[int]],
           fallback: ArrayData | None) -> dict:
    """Save ``proto`` to ``args.output``; sizes, compressed sizes and fidelity vs ``model`` as report keys."""
    after = ir.save(proto, args.output, source=args.model)
    method = sparsity.compression_method()
    data = open_data(args.data, model.proto, shapes, 8) if args.data else \
        fallback if fallback is not None else open_data("random", model.proto, shapes, 8)
    ev = quality.evaluate(proto, data, model, shapes).to_json()
    return {
        "file_bytes_before": model.file_bytes, "file_bytes_after": after,
        "compressed_bytes_before": sparsity.compressed_size(model.path, method),
        "compressed_bytes_after": sparsity.compressed_size(Path(args.output), method),
        "compression": method,
        "data": f"{data.num_samples} samples from {data.source or data.kind}",
        "fidelity": ev["fidelity"], "accuracy": ev["accuracy"], "reference_accuracy": ev["reference_accuracy"],
    }


def print_skipped(skipped: list[dict]) -> None:
    if skipped:
        fmt.table("skipped", ["layer", "tensor", "reason"], [[s["name"], s["tensor"], s["reason"]] for s in skipped])


def print_totals(r: dict) -> None:
    b = fmt.human_bytes
    rows = [["file size", b(r["file_bytes_before"]), b(r["file_bytes_after"])],
            [f"compressed ({r['compression']})", b(r["compressed_bytes_before"]), b(r["compressed_bytes_after"])]]
    if r["accuracy"]:
        rows.append(["top-1 accuracy", f"{r['reference_accuracy']['top1']:.2%}", f"{r['accuracy']['top1']:.2%}"])
    fmt.table(None, ["", "before", "after"], rows, right=(1, 2))
    for name, f in (r["fidelity"] or {}).items():
        agree = "" if f["top1_agreement"] is None else f", top-1 agreement {f['top1_agreement']:.2%}"
        fmt.out.print(f"fidelity of '{name}' on {r['data']}: rel error {f['rel_error']:.4g}, "
                      f"cosine {f['cosine']:.6f}{agree}", soft_wrap=True)
