"""``onnxprune share``: weight sharing -- each large weight becomes a k-means codebook plus uint8 indices.

    onnxprune share model.onnx -o shared.onnx --clusters 16
    onnxprune share model.onnx -o folded.onnx --clusters 16 --fold

The saved model keeps ``<w>.codebook`` ([K] floats) and ``<w>.indices`` (uint8; with K <= 16,
two 4-bit indices per byte unless --no-pack) and rebuilds each weight in the graph with
Cast + Gather, so the file really shrinks and onnxruntime runs it as is.  --fold writes the
dense weights codebook[indices] instead (same graph as the input; compresses well).  Only
Conv/ConvTranspose/Gemm/MatMul weights of at least --min-size elements are shared, and only
when that saves bytes.  Fidelity to the original is measured on --data (default 8 random
samples), and accuracy too when that data has ``labels``.

JSON keys (stable; see ``onnxprune.compress.sharing`` for the per-layer ones): clusters, packed, fold,
layers, skipped, file_bytes_before, file_bytes_after, compressed_bytes_before,
compressed_bytes_after, compression, data, fidelity, accuracy, reference_accuracy.
"""

from __future__ import annotations

import argparse

from .. import ir
from ..compress import sharing
from ..compress.report import save_and_measure
from ..data import open_data
from . import fmt, options


def register(sub) -> None:
    p = sub.add_parser("share", help="weight sharing: k-means codebook + uint8 indices per weight tensor",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p)
    p.add_argument("--clusters", type=int, default=16, metavar="K",
                   help=f"centroids per tensor, 2..{sharing.MAX_CLUSTERS} (default 16)")
    p.add_argument("--fold", action="store_true", help="write dense float weights codebook[indices] instead")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="store one index per byte even when K <= 16")
    options.add_selection(p)
    options.add_fidelity_report(p, "sharing report")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "data")
    json_out = options.json_path(args)
    out = options.output_path(args)
    opts = sharing.ShareOptions(clusters=args.clusters, min_size=args.min_size, ignore=tuple(args.ignore),
                                pack=args.pack, fold=args.fold)
    shapes = options.input_shapes(args)
    model = ir.load(args.model)
    result = sharing.share(model.proto, opts, progress=fmt.progress)
    data = open_data(args.data or "random", model.proto, shapes, 8)
    report = result.report(save_and_measure(model, result.proto, out, data, shapes))
    fmt.table(f"weight sharing, K = {opts.clusters}" + (" (folded to dense)" if opts.fold else ""),
              ["layer", "shape", "K used", "index bits", "bytes before", "bytes after", "weight err"],
              [[lr.name, "x".join(map(str, lr.shape)), lr.clusters, lr.bits, fmt.human_bytes(lr.bytes_before),
                fmt.human_bytes(lr.bytes_after), f"{lr.weight_error:.4f}"] for lr in result.layers],
              right=(2, 3, 4, 5, 6))
    fmt.skipped(result.skipped)
    fmt.compression_totals(report)
    if json_out:
        fmt.write_json(json_out, report)
    return 0
