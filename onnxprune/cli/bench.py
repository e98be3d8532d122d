"""``onnxprune bench``: latency of a model in onnxruntime or OpenVINO, and its ratio to a reference.

    onnxprune bench pruned.onnx --reference model.onnx --runs 100 --threads 1

Inputs are synthetic, made from the model's input shapes (symbolic dimensions
are 1 unless given with --input-shape; the batch dimension is --batch-size).
With --reference the two models run in turn (A B A B ...), so a noisy machine
slows both alike and the p50 ratio stays fair.

JSON keys (stable)::

    models       {name: {"p50_ms", "p90_ms", "mean_ms", "min_ms", "std_ms", "runs"}}, the model first
    ratio_p50    p50 of the model / p50 of the reference, or null without --reference
    threads      intra-op threads used (onnxruntime's default is recorded as the CPU count)
    provider     execution provider (e.g. CPUExecutionProvider) or OpenVINO device (CPU)
    runtime      where it ran: {"runtime": onnxruntime|openvino, "providers", "session_options", "sessions"}
    batch_size   samples per run
"""

from __future__ import annotations

import argparse

from .. import ir, runtime
from ..measure import latency
from . import fmt, options


def register(sub) -> None:
    p = sub.add_parser("bench", help="latency of a model (onnxruntime or OpenVINO), and its ratio to a reference",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    p.add_argument("--reference", metavar="ORIG", help="original model to compare against (run interleaved)")
    p.add_argument("--runs", type=int, default=50, metavar="N", help="timed runs per model (default 50)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="untimed runs first (default 10)")
    p.add_argument("--threads", type=int, metavar="N", help="intra-op threads (default: the runtime's)")
    p.add_argument("--batch-size", type=int, default=1, metavar="N", help="samples per run (default 1)")
    options.add_input_shapes(p)
    options.add_json(p, "latencies")
    options.add_runtime(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options.run_count("--runs", args.runs, low=1)
    options.run_count("--warmup", args.warmup)
    json_out = options.json_path(args)
    shapes = options.input_shapes(args)
    models = {args.model: ir.load(args.model)}
    if args.reference:
        name = args.reference if args.reference != args.model else f"{args.reference} (reference)"
        models[name] = ir.load(args.reference)
    result = latency.benchmark(models, None, warmup=args.warmup, runs=args.runs, threads=args.threads,
                               batch_size=args.batch_size, input_shapes=shapes)
    print_result(result)
    if json_out:
        fmt.write_json(json_out, {**result.to_json(), "runtime": runtime.current().to_json()})
    return 0


def print_result(result: latency.Benchmark) -> None:
    first = next(iter(result.values()))
    fmt.out.print(f"latency in ms: {first.runs} runs, {first.threads} threads, {first.runtime} {first.provider}, "
                  f"batch size {first.batch_size}", soft_wrap=True)
    fmt.table(None, ["model", "p50", "p90", "mean", "min", "std"],
              [[name, f"{s.p50:.3f}", f"{s.p90:.3f}", f"{s.mean:.3f}", f"{s.min:.3f}", f"{s.std:.3f}"]
               for name, s in result.items()], right=range(1, 6))
    if result.ratio_p50 is not None:
        fmt.out.print(f"p50 ratio (model / reference): {result.ratio_p50:.3f}x")
