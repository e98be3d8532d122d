"""onnxprune sensitivity: how much each group of coupled layers can lose, measured.

Prunes every prunable group alone at several ratios, evaluates each candidate in
onnxruntime (accuracy when the data has labels, else agreement with the original)
and prints the drop in points. --json saves the curves and, per group, the largest
ratio within --threshold: feed it back with `onnxprune prune --ratios-from FILE`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .. import pipeline
from ..data import open_data
from ..errors import OnnxPruneError
from ..measure import plots
from ..search.sensitivity import analyze_sensitivity
from . import fmt, options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sensitivity", help="prune each group alone at several ratios and measure the cost",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    p.add_argument("--data", required=True, metavar="DATA",
                   help="evaluation data (.npz or image folder; labels optional)")
    p.add_argument("--ratios", default="0.2,0.4,0.6,0.8", help="comma-separated ratios (default 0.2,0.4,0.6,0.8)")
    p.add_argument("--criterion", default="l2", help="which channels go first (default l2)")
    p.add_argument("--calib", metavar="DATA", help="calibration data (.npz, image folder or 'random') "
                                                   "for calibration-based criteria")
    p.add_argument("--limit", type=int, default=512, metavar="N", help="evaluate on the first N samples (512)")
    p.add_argument("--threshold", default="1.0", metavar="POINTS",
                   help="drop allowed when suggesting per-group ratios (default 1.0 point)")
    p.add_argument("--plot", metavar="PNG", help="save the curves as a PNG (needs matplotlib)")
    options.add_input_shapes(p)
    options.add_json(p, "curves and suggested ratios")
    options.add_runtime(p)
    options.add_images(p)
    p.set_defaults(func=run)


def _ratios(text: str) -> list[float]:
    out = [options.fraction("--ratios", x.strip()) for x in text.split(",") if x.strip()]
    if not out:
        raise OnnxPruneError("--ratios: give at least one ratio, e.g. 0.2,0.5")
    return sorted(set(out))


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "data", "calib")
    ratios = _ratios(args.ratios)
    threshold = options.fraction("--threshold", args.threshold, high=100.0, high_open=False)
    if args.limit is not None and args.limit < 1:
        raise OnnxPruneError(f"--limit {args.limit}: must be at least 1")
    json_path = options.json_path(args) if hasattr(options, "json_path") else args.json
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise OnnxPruneError(f"{args.plot}: folder does not exist")
    pruner = pipeline.Pruner(args.model, criterion=args.criterion, input_shapes=options.input_shapes(args),
                             calib=args.calib, progress=fmt.progress)
    data = open_data(args.data, pruner.original.proto, pruner.analysis.input_shapes)
    sens = analyze_sensitivity(pruner, data, ratios, threshold=threshold, limit=args.limit, progress=fmt.progress)
    rows = []
    for g in sens.groups:
        drops = ["-" if math.isinf(d) else f"{d:+.2f}" for d in g["drops"]]
        rows.append([g["group"], g["label"], g["size"], *drops, f"{sens.suggested()[g['label']]:g}"])
    fmt.table(f"drop in {sens.metric} (points; baseline {sens.baseline:.2f})",
              ["group", "first layer", "channels", *[f"r={r:g}" for r in ratios], "suggested"], rows,
              right=tuple(range(2, 4 + len(ratios))))
    if json_path:
        fmt.write_json(json_path, sens.to_json())
    if args.plot and not plots.sensitivity_curves(sens, args.plot):
        print(f"note: {plots.INSTALL_HINT}", file=sys.stderr)
    return 0
