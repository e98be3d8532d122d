"""onnxprune prune: structured channel pruning, verified against the masked original.

Removes the least important channels of every group of coupled layers, slices
the tensors for real, checks the result in onnxruntime against the original
model with the removed channels masked to zero, and writes the smaller model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import pipeline
from ..errors import OnnxPruneError
from ..plan import Plan, Policy
from . import fmt, options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels, filters and heads; verify; save",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p)
    g = p.add_argument_group("what to remove")
    g.add_argument("--ratio", default="0.3", help="fraction of each group's channels to remove (default 0.3)")
    g.add_argument("--criterion", default="l2", help="importance criterion (default l2; see docs/criteria.md)")
    g.add_argument("--group-reduction", default="mean", choices=["mean", "sum", "max"],
                   help="how the scores of coupled layers combine (default mean)")
    g.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels across groups instead of the same ratio in each")
    g.add_argument("--max-ratio", default="0.9", help="with --global: at most this fraction of any group")
    g.add_argument("--ratio-for", action="append", default=[], metavar="NAME=R",
                   help="ratio for the group containing layer or weight NAME (repeatable)")
    g.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="leave the group containing layer or weight NAME untouched (repeatable)")
    g.add_argument("--round-to", type=int, default=None, metavar="N",
                   help="keep channel counts multiples of N (e.g. 8) so kernels stay fast")
    g.add_argument("--heads", action="store_true",
                   help="when a channel axis is split (attention heads), prune whole heads rather than "
                        "the same dimensions of every head")
    g.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of scoring")
    d = p.add_argument_group("data")
    d.add_argument("--calib", metavar="DATA", help="calibration data: an .npz named after the model inputs, "
                                                   "or 'random'")
    options.add_input_shapes(d)
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="PATH", help="write the JSON report here")
    o.add_argument("--save-plan", metavar="PATH", help="write the plan (removed channels per group) as JSON")
    o.add_argument("--dry-run", action="store_true", help="analyse, score and plan; write nothing but the plan")
    o.add_argument("--no-verify", action="store_true", help="skip the masked-reference check (not recommended)")
    p.set_defaults(func=run)


def policy_from(args: argparse.Namespace) -> Policy:
    return Policy(ratio=options.fraction("--ratio", args.ratio),
                  ratio_for=options.name_values("--ratio-for", args.ratio_for),
                  ignore=list(args.ignore), round_to=args.round_to, global_ranking=args.global_ranking,
                  max_ratio=options.fraction("--max-ratio", args.max_ratio))


def _read_plan(path: str | None):
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise OnnxPruneError(f"--plan {path}: cannot read a JSON plan ({e.__class__.__name__})") from None


def run(args: argparse.Namespace) -> int:
    policy = policy_from(args)
    out = Path(args.output)
    if Path(args.model).exists() and out.exists() and out.resolve() == Path(args.model).resolve():
        raise OnnxPruneError(f"{out}: output path is the input model; choose another -o path")
    for path in (args.report, args.save_plan):
        if path and not (Path(path).parent if str(Path(path).parent) else Path(".")).is_dir():
            raise OnnxPruneError(f"{path}: folder does not exist")
    result = pipeline.prune(args.model, policy=policy, criterion=args.criterion,
                            group_reduction=args.group_reduction, input_shapes=options.input_shapes(args),
                            calib=args.calib, plan=_read_plan(args.plan), verify=not args.no_verify,
                            split_carrier="outer" if args.heads else "largest", progress=fmt.progress)
    if args.save_plan:
        fmt.write_json(args.save_plan, result.plan.to_json(result.analysis))
    if args.dry_run:
        print_summary(result, None)
        return 0
    size = pipeline.save(result, out)
    rep = result.report()
    rep["output"] = str(out)
    rep["file_bytes_after"] = size
    if args.report:
        fmt.write_json(args.report, rep)
    print_summary(result, size)
    return 0


def print_summary(result: pipeline.PruneResult, size_after: int | None) -> None:
    rep = result.report()
    b, a = result.before, result.after

    def pct(x, y):
        return f"{100.0 * y / x:.1f}%" if x else "-"
    rows = [
        ("params", fmt.human_count(b.params), fmt.human_count(a.params), pct(b.params, a.params)),
        ("MACs", fmt.human_count(b.macs), fmt.human_count(a.macs), pct(b.macs, a.macs)),
    ]
    if size_after is not None:
        fb = result.original.file_bytes
        rows.append(("file size", fmt.human_bytes(fb), fmt.human_bytes(size_after), pct(fb, size_after)))
    fmt.table(None, ["", "before", "after", "kept"], rows, right=(1, 2, 3))
    ver = result.verification
    status = ("verified against the masked original" if ver and ver.passed else "NOT verified (--no-verify)")
    fmt.out.print(f"groups: {rep['groups_found']} found, {rep['groups_pruned']} pruned, "
                  f"{rep['groups_frozen']} frozen; {status}"
                  + (f" (worst relative error {ver.needed_rtol:.1e})" if ver and ver.passed else ""))
    reasons = {}
    for fz in rep["frozen"]:
        for r in fz["reasons"][:1]:
            reasons[r] = reasons.get(r, 0) + 1
    for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  frozen x{n}: {r}", file=sys.stderr)
