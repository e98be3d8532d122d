"""onnxprune prune: structured channel pruning, verified against the masked original.

Removes the least important channels of every group of coupled layers, slices
the tensors for real, checks the result in onnxruntime against the original
model with the removed channels masked to zero, and writes the smaller model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .. import importance, pipeline, report, runtime
from ..search import budget
from ..measure import clock, latency, pass_cost
from ..compress import quantize as quant
from ..data import open_data
from ..runtime import ortformat
from ..errors import OnnxPruneError
from ..plan import Policy, check_names, nothing_removed, plan_entries, removal_summary
from . import fmt, options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="remove channels, filters and heads; verify; save",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p, required=False)
    g = p.add_argument_group("what to remove")
    g.add_argument("--ratio", default=None, help="fraction of each group's channels to remove (default 0.3; "
                                                 "0 with --slice-hidden)")
    g.add_argument("--criterion", help="importance criterion: " + ", ".join(importance.CRITERIA) + ", or auto: "
                   "score l2, wanda, fluctuation and obs and keep the one whose refit model is closest to the "
                   "original on held-out calibration data (the default with real --calib data; l2 otherwise; "
                   "see docs/criteria.md)")
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
                   help="keep channel counts multiples of N so onnxruntime's blocked CPU kernels stay fast "
                        "(default: this CPU's SIMD block, 16 with AVX-512, else 8; 1 = exact ratios)")
    g.add_argument("--heads", action="store_true",
                   help="when a channel axis is split (attention heads), prune whole heads rather than "
                        "the same dimensions of every head")
    g.add_argument("--slice-hidden", action="store_true",
                   help="transformers: rotate the residual stream (verified exact) and remove its least-used "
                        "directions, chosen by PCA of --calib; embeddings and every layer shrink (approximate: "
                        "measure with --data; see docs/transformers.md). --ratio then defaults to 0")
    g.add_argument("--hidden-keep", metavar="F", help="with --slice-hidden: fraction of the hidden width kept "
                                                      "(default: from --target-params/--target-macs, else 1)")
    g.add_argument("--kv-cache", action="store_true",
                   help="let KV-cache inputs (past_key_values.*, past_*) and outputs (present.*) shrink with "
                        "their attention heads; the pruned model declares their new shapes (otherwise every "
                        "graph input and output keeps its shape)")
    g.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of scoring")
    g.add_argument("--ratios-from", metavar="SENS.json",
                   help="per-group ratios suggested by 'onnxprune sensitivity --json' (scaled by budget search)")
    b = p.add_argument_group("budgets (instead of --ratio: the ratio is searched)")
    b.add_argument("--target-macs", metavar="F", help="keep at most this fraction of the MACs, e.g. 0.5")
    b.add_argument("--target-params", metavar="F", help="keep at most this fraction of the parameters")
    b.add_argument("--target-latency", metavar="F",
                   help="keep at most this fraction of the measured onnxruntime latency")
    b.add_argument("--max-drop", metavar="POINTS",
                   help="with --data: lose at most this many accuracy points (or agreement points without "
                        "labels); if the target needs more, the strongest model within the floor is saved")
    b.add_argument("--allocation", default="uniform", choices=budget.ALLOCATIONS,
                   help="how the searched strength spreads over groups: the same ratio everywhere (uniform), "
                        "or more from groups whose channels cost more time than MACs, such as the expanded "
                        "width of inverted residual blocks (latency; see docs/latency.md)")
    d = p.add_argument_group("data")
    d.add_argument("--calib", metavar="DATA", help="calibration data: an .npz named after the model inputs, "
                                                   "a folder of images, or 'random'")
    d.add_argument("--reconstruct", default="auto", choices=["auto", "ls", "bias", "none"],
                   help="repair pruned layers from calibration data: least squares (ls), bias compensation "
                        "(bias) or none; auto = ls with real --calib data, else none")
    d.add_argument("--reconstruct-stages", type=int, metavar="N",
                   help="passes over the calibration data for ls (default 4; 1 is about twice as fast on "
                        "deep models, fitting deeper layers on slightly staler inputs; see docs/reconstruction.md)")
    d.add_argument("--data", metavar="DATA", help="validation data (.npz or image folder, labels optional): "
                                                  "accuracy or fidelity and latency before/after are measured "
                                                  "and reported")
    d.add_argument("--metric", choices=["auto", "perplexity"], default="auto",
                   help="what --data measures: auto = accuracy with labels, else fidelity; perplexity = "
                        "next-token perplexity of a causal LM (--data an .npz with 'input_ids', optional "
                        "'attention_mask')")
    d.add_argument("--bench-runs", type=int, default=20, metavar="N",
                   help="timed onnxruntime runs per model for the latency row (with --data; 0 = skip)")
    options.add_input_shapes(d)
    d.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="after pruning, fine-tune N steps distilling the original (see 'onnxprune finetune')")
    d.add_argument("--finetune-data", metavar="DATA", help="training data for --finetune-steps (default: --calib)")
    options.add_training(p, prefix="finetune-")
    options.add_images(p)
    o = p.add_argument_group("output")
    o.add_argument("--report", metavar="PATH", help="write the JSON report here")
    o.add_argument("--report-md", metavar="PATH", help="write a Markdown report here")
    o.add_argument("--save-plan", metavar="PATH", help="write the plan (removed channels per group) as JSON")
    o.add_argument("--dry-run", action="store_true", help="analyse, score and plan; write nothing but the plan")
    o.add_argument("--no-verify", action="store_true", help="skip the masked-reference check (not recommended)")
    options.add_quantize(p, prefix="quantize-")
    options.add_ort(p)
    options.add_runtime(p)
    p.set_defaults(func=run)


def policy_from(args: argparse.Namespace) -> Policy:
    if args.ratio is None:
        args.ratio = "0" if getattr(args, "slice_hidden", False) else "0.3"
    return Policy(ratio=options.fraction("--ratio", args.ratio),
                  ratio_for=options.name_values("--ratio-for", args.ratio_for),
                  ignore=list(args.ignore), round_to=round_to_from(args.round_to),
                  global_ranking=args.global_ranking,
                  max_ratio=options.fraction("--max-ratio", args.max_ratio))


def round_to_from(value: int | None) -> int | None:
    """``--round-to``: None means this machine's SIMD block; 1 turns rounding off."""
    n = latency.simd_block() if value is None else value
    if n < 1:
        raise OnnxPruneError(f"--round-to {n}: must be a positive integer (1 keeps exact ratios)")
    return None if n == 1 else n


def budget_from(args: argparse.Namespace) -> budget.Budget:
    def f(name, v, high=1.0):
        return None if v is None else options.fraction(name, v, low=1e-9, high=high, high_open=False)
    b = budget.Budget(macs=f("--target-macs", args.target_macs), params=f("--target-params", args.target_params),
                      latency=f("--target-latency", args.target_latency),
                      max_drop=None if args.max_drop is None else options.fraction("--max-drop", args.max_drop,
                                                                                   high=100.0, high_open=False))
    b.check()
    return b


def _read_ratios(path: str) -> dict[str, float]:
    try:
        data = json.loads(Path(path).read_text())
        ratios = data["suggested_ratios"]
        return {str(k): float(v) for k, v in ratios.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise OnnxPruneError(f"--ratios-from {path}: not a sensitivity JSON with 'suggested_ratios' "
                             f"({e.__class__.__name__})") from None


def _read_plan(path: str | None):
    if not path:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise OnnxPruneError(f"--plan {path}: cannot read a JSON plan ({e.__class__.__name__})") from None
    try:
        plan_entries(data)
    except OnnxPruneError as e:
        raise OnnxPruneError(f"--plan {path}: {e}") from None
    return data


def run(args: argparse.Namespace) -> int:
    start, cpu_start = time.perf_counter(), time.process_time()
    options.image_data(args, "calib", "data", "finetune_data")
    policy = policy_from(args)
    if not args.output and not args.dry_run:
        raise OnnxPruneError("-o OUT is required: where to write the pruned model (or --dry-run to plan only)")
    out = Path(args.output) if args.output else None
    options.run_count("--bench-runs", args.bench_runs)
    if args.reconstruct_stages is not None and args.reconstruct_stages < 1:
        raise OnnxPruneError(f"--reconstruct-stages {args.reconstruct_stages}: must be 1 or more")
    for flag, path in (("-o", None if args.dry_run else args.output), ("--report", args.report),
                       ("--save-plan", args.save_plan), ("--report-md", args.report_md)):
        options.writable_file(flag, path)
    target = budget_from(args)
    plan = _read_plan(args.plan)
    if plan is not None and target.active:
        raise OnnxPruneError("--plan replays a fixed plan; it cannot be combined with --target-*")
    if args.slice_hidden:
        return _run_sliced(args, policy, target, plan, out)
    if args.hidden_keep is not None:
        raise OnnxPruneError("--hidden-keep goes with --slice-hidden")
    criterion = args.criterion or ("auto" if args.calib not in (None, "random") and plan is None else "l2")
    pruner = pipeline.Pruner(args.model, criterion=criterion, group_reduction=args.group_reduction,
                             input_shapes=options.input_shapes(args), calib=args.calib,
                             split_carrier="outer" if args.heads else "largest", progress=fmt.progress,
                             score=plan is None, kv_cache=args.kv_cache)
    if args.reconstruct_stages is not None:
        pruner.reconstruct_options["stages"] = args.reconstruct_stages
    if plan is None and not pruner.analysis.prunable:
        raise OnnxPruneError(nothing_to_prune(pruner.analysis))
    check_names(pruner.analysis, args.ignore, "--ignore")
    check_names(pruner.analysis, policy.ratio_for, "--ratio-for")
    if args.ratios_from:
        suggested = _read_ratios(args.ratios_from)
        check_names(pruner.analysis, suggested, f"--ratios-from {args.ratios_from}: layer")
        policy.ratio_for.update(suggested)
        policy.check()
    data = _validation_data(args, pruner)
    if target.active:
        outcome, result = budget.search(pruner, policy, target, data, reconstruct=args.reconstruct,
                                        progress=fmt.progress, allocation=args.allocation)
        result.extra["budget"] = outcome.to_json()
        if outcome.message:
            print(f"note: {outcome.message}", file=sys.stderr)
    else:
        if target.max_drop is not None or args.allocation != "uniform":
            raise OnnxPruneError(f"{'--max-drop' if target.max_drop is not None else '--allocation'} goes with "
                                 "a --target-* budget")
        the_plan = plan if plan is not None else pruner.plan(policy)
        if plan is None and not the_plan.count():
            raise OnnxPruneError("the plan removes nothing: " + nothing_removed(
                removal_summary(pruner.analysis, the_plan, policy), policy) + "; no model written")
        if plan is not None and not any(g.get("removed") for g in plan.get("groups", [])):
            raise OnnxPruneError(f"--plan {args.plan} removes nothing; no model written")
        result = pruner.finish(the_plan, verify=not args.no_verify, reconstruct=args.reconstruct)
        if plan is None:
            result.extra["removal"] = removal_summary(pruner.analysis, the_plan, policy)
            result.extra["removal"]["round_to_is_cli_default"] = args.round_to is None
    if args.finetune_steps and not args.dry_run:
        _finetune(args, pruner, result)
    return _finish(args, result, data, policy, out, pruner, (start, cpu_start))


def _finish(args: argparse.Namespace, result: pipeline.PruneResult, data, policy: Policy, out: Path,
            pruner: pipeline.Pruner | None = None, start: tuple[float, float] = (0.0, 0.0)) -> int:
    """Validate, write the plan, model and reports, print the summary."""
    if args.quantize and not args.dry_run:
        _quantize(args, result, data, pruner)
    if data is not None:
        pipeline.evaluate(result, data, bench_runs=args.bench_runs, progress=fmt.progress)
    if args.save_plan:
        fmt.write_json(args.save_plan, result.plan.to_json(result.analysis))
    if args.dry_run:
        print_summary(result, None)
        return 0
    size = pipeline.save(result, out)   # the result now names its output and its size
    result.extra["formats"] = ortformat.formats(out, size, result.proto, args.ort, options.input_shapes(args))
    passes = _in_passes(pruner, result, start) if pruner is not None else None
    result.extra.update(round_to=policy.round_to or 1, calibration_passes=passes,
                        runtime=runtime.current().to_json())
    if args.report:
        fmt.write_json(args.report, result.report())
    if args.report_md:
        text, notes = report.markdown(result, args.report_md)
        fmt.write_text(args.report_md, text)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    print_summary(result, size)
    if passes is not None:
        print(f"prune time {passes['prune_seconds']:.1f} s = {passes['passes']} calibration passes (one onnxruntime "
              f"pass of the original over the {passes['samples']} calibration samples: {passes['pass_seconds']:.2f} s); "
              f"in CPU time {passes['cpu_passes']} passes", file=sys.stderr)
    return 0


def _quantize(args: argparse.Namespace, result: pipeline.PruneResult, data, pruner) -> None:
    """INT8 after pruning: the pruned float model is measured as the quantizer's input, the original as
    the chain's start (see 'onnxprune quantize'); the saved model and ``--data`` rows become the INT8 ones."""
    calib = pruner.data if pruner is not None else None
    if not args.quantize_dynamic and (calib is None or calib.kind == "random"):
        raise OnnxPruneError("--quantize int8 needs real --calib data for activation ranges (or --quantize-dynamic)")
    with clock.stage_time(result.seconds, "quantize"):
        q, how = quant.quantize(result.proto, None if args.quantize_dynamic else calib,
                                dynamic=args.quantize_dynamic, per_channel=not args.quantize_per_tensor,
                                samples=args.quantize_calib_samples)
    if data is not None and data.kind != "tokens":
        how["measured"] = quant.measure(q, result.proto, data, original=result.original.proto,
                                        bench_runs=args.bench_runs, input_shapes=options.input_shapes(args))
    result.proto = q
    result.extra["quantization"] = how


def _in_passes(pruner: pipeline.Pruner, result: pipeline.PruneResult, start: tuple[float, float]) -> dict | None:
    """The prune's wall and CPU time since ``start`` (validation with --data left out) in passes of the
    original over --calib."""
    if pruner.data is None or pruner.data.kind == "random":
        return None
    wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
    ref = pass_cost.reference_pass(pruner.original.proto, pruner.data)
    validate = result.seconds.get("validate", 0.0)
    return pass_cost.in_passes(wall - validate, ref, cpu - validate * (cpu / max(wall, 1e-9)))


def _validation_data(args: argparse.Namespace, pruner):
    """``--data`` as accuracy/fidelity data, or as token ids with ``--metric perplexity``."""
    if args.metric == "perplexity":
        if not args.data:
            raise OnnxPruneError("--metric perplexity measures --data: add --data TOKENS.npz")
        from ..measure import perplexity

        return perplexity.token_data(args.data, pruner.original.proto, pruner.analysis.input_shapes)
    return open_data(args.data, pruner.original.proto, pruner.analysis.input_shapes) if args.data else None


def _run_sliced(args: argparse.Namespace, policy: Policy, target: budget.Budget, plan, out: Path) -> int:
    """``--slice-hidden``: the hidden-width stage, then (with --ratio) channel pruning of the sliced model."""
    from .. import hidden

    for flag, bad in (("--plan", plan is not None), ("--target-latency", target.latency is not None),
                      ("--max-drop", target.max_drop is not None), ("--finetune-steps", bool(args.finetune_steps)),
                      ("--dry-run", args.dry_run), ("--ratios-from", bool(args.ratios_from)),
                      ("--allocation", args.allocation != "uniform")):
        if bad:
            raise OnnxPruneError(f"{flag} does not combine with --slice-hidden yet")
    if not args.calib:
        raise OnnxPruneError("--slice-hidden chooses the directions to keep from data: add --calib DATA.npz "
                             "(--calib random only checks the rotation)")
    keep = None if args.hidden_keep is None else options.fraction("--hidden-keep", args.hidden_keep, low=1e-9,
                                                                  high=1.0, high_open=False)
    if args.calib == "random" and (target.active or (keep is not None and keep < 1)):
        raise OnnxPruneError("--slice-hidden keeps the directions real data uses: random inputs cannot choose "
                             "them (--calib random only checks the rotation, at full width)")
    width = None
    round_to = policy.round_to or 1
    if target.active:
        if keep is not None or policy.ratio > 0:
            raise OnnxPruneError("with --slice-hidden, a --target-* budget searches the hidden width alone: "
                                 "drop --hidden-keep and --ratio")
        from ..ir import load
        width, fr = hidden.slicing.width_for_budget(load(args.model), params=target.params, macs=target.macs,
                                                    input_shapes=options.input_shapes(args), round_to=round_to,
                                                    inplace=True)
    result = pipeline.prune_sliced(args.model, policy=policy, criterion=args.criterion or "l2", calib=args.calib,
                                   input_shapes=options.input_shapes(args), width=width, keep=keep,
                                   round_to=round_to, verify=not args.no_verify, reconstruct=args.reconstruct,
                                   progress=fmt.progress)
    data = _validation_data(args, result)
    return _finish(args, result, data, policy, out)


def _finetune(args: argparse.Namespace, pruner: pipeline.Pruner, result: pipeline.PruneResult) -> None:
    cfg = options.training_config(args, args.finetune_steps, prefix="finetune-")
    spec = args.finetune_data or args.calib
    if spec in (None, "random"):
        raise OnnxPruneError("--finetune-steps needs real training data: pass --finetune-data DATA.npz "
                             "(or an .npz --calib)")
    data = pruner.data if spec == args.calib and pruner.data is not None else open_data(
        spec, pruner.original.proto, pruner.analysis.input_shapes)
    pipeline.finetune(result, data, cfg, progress=fmt.progress, log=fmt.log)


def nothing_to_prune(analysis) -> str:
    """The one-line error for a model without a prunable channel group."""
    if not analysis.groups:
        return ("nothing to prune: the model has no Conv, ConvTranspose, Gemm or MatMul layer with constant "
                "weights" + (f" (first barrier: {analysis.barriers[0].op} '{analysis.barriers[0].node}': "
                             f"{analysis.barriers[0].reason})" if analysis.barriers else ""))
    first = next((r for g in analysis.groups for r in g.reasons), "single channels")
    return (f"nothing to prune: all {len(analysis.groups)} channel group(s) are frozen (first reason: {first}); "
            "only layers whose channels flow to other prunable layers can shrink")


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
    rows += report.validation_rows(rep.get("validation"))
    fmt.table(None, ["", "before", "after", "after/before"], rows, right=(1, 2, 3))
    ver = result.verification
    status = ("verified: equals the masked original" if ver and ver.passed else "NOT verified (--no-verify)")
    worst = ver.worst() if ver and ver.passed else None
    margin = (f" (largest difference {worst.max_abs:.1e} on '{worst.name}', {100 * worst.max_abs / worst.tolerance:.2g}% "
              f"of the tolerance applied there, {worst.tolerance:.1e})" if worst is not None and worst.tolerance else "")
    fmt.out.print(f"groups: {rep['groups_found']} found, {rep['groups_pruned']} pruned, "
                  f"{rep['groups_frozen']} frozen; {status}{margin}", soft_wrap=True)
    print_removal(rep.get("removal"))
    honest_notes(result, rep)
    h = rep.get("hidden")
    if h:
        rv = h.get("rotation_verification") or {}
        worst = max((o["max_abs"] / o["scale"] if o["scale"] else o["max_abs"] for o in rv.get("outputs", [])),
                    default=None)
        fmt.out.print(f"hidden width {h['width_before']} -> {h['width_after']} ({h['norms']} norms, "
                      f"{h['writers']} writers, {h['readers']} readers); rotation "
                      + ("verified exact" + (f" (worst relative error {worst:.1e})" if worst is not None else "")
                         if h["rotation_verified"] else "NOT verified")
                      + f"; slicing keeps {100 * h['variance_kept']:.1f}% of the normalised stream's variance "
                        "(approximate: measured with --data)")
    reasons = {}
    for fz in rep["frozen"]:
        for r in fz["reasons"][:1]:
            reasons[r] = reasons.get(r, 0) + 1
    for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  frozen x{n}: {r}", file=sys.stderr)
    for note in rep.get("configs", []) + rep.get("validity", []):
        print(f"  {note}", file=sys.stderr)


def print_removal(removal: dict | None) -> None:
    """One line: the share of channels really removed against the ratio asked, and the groups left whole."""
    if not removal or not removal["groups"]:
        return
    asked = removal["asked_ratio"]
    rounding = (f"channel counts in multiples of {removal['round_to']}"
                + (" (the command line's default on this CPU; the Python API keeps exact ratios unless told)"
                   if removal.get("round_to_is_cli_default") else "") + "; --round-to 1 keeps exact ratios"
                if removal["round_to"] > 1 else "exact ratios")
    per = [g["removed_ratio"] for g in removal["groups"]]
    line = (f"removed {100 * removal['removed_ratio']:.1f}% of the channels of {len(removal['groups'])} groups"
            + (f", {100 * min(per):.0f}% to {100 * max(per):.0f}% per group" if max(per) - min(per) > 0.005 else "")
            + (f" (asked {100 * asked:g}%; {rounding})" if asked is not None else f" ({rounding})"))
    whole = removal["left_whole"]
    if whole:
        names = ", ".join(f"{w['label']} [{w['size']}]" for w in whole[:4]) + (", ..." if len(whole) > 4 else "")
        line += f"; left whole: {len(whole)} group(s) ({names}) by {whole[0]['why']}"
    fmt.out.print(line, soft_wrap=True, markup=False)


def honest_notes(result: pipeline.PruneResult, rep: dict) -> None:
    """What 'verified' does not say: outputs nearly constant on the verification inputs, and, without data,
    that accuracy is unmeasured."""
    ver = result.verification
    if ver and ver.passed:
        flat = ver.nearly_constant(o.name for o in result.original.graph.output)
        if flat:
            print(f"note: output(s) {', '.join(repr(n) for n in flat)} hardly varied on the verification inputs "
                  "(random unless --calib is real data), so their check says little; measure with --data",
                  file=sys.stderr)
    if not rep.get("validation"):
        no_calib = str(rep.get("importance_data")) in ("none", "random", "None", "")
        print("note: 'verified' means the pruned model computes what the original computes with the removed "
              "channels zeroed; it says nothing about accuracy, which was not measured (no --data). Measure it "
              "with --data DATA" + (", and choose channels and repair layers from real inputs with --calib DATA"
                                    if no_calib else ""), file=sys.stderr)
