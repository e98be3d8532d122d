"""``onnxprune eval``: accuracy, fidelity to a reference, and size of a model on data.

    onnxprune eval pruned.onnx --data test.npz --reference model.onnx --json eval.json

``--data`` is an .npz named after the model's inputs (optional int ``labels``),
a folder of images (labels from class subfolders, decoded as the image flags
say), or ``random`` for synthetic inputs. Accuracy needs labels; fidelity needs
``--reference``; with neither, only the size statistics are shown.

JSON keys (stable; absent values are null)::

    model                 path of the evaluated model
    reference             path of the reference model, or null
    samples               number of samples evaluated
    accuracy              {"top1", "top5"} fractions in [0, 1] (top5 null with <= 5 classes), or null
    reference_accuracy    the same for the reference, or null
    fidelity              {output_name: {"top1_agreement", "cosine", "max_abs", "mean_abs", "rel_error"}}
                          per model output vs the reference (top1_agreement null when the output is
                          not class scores), or null
    params, macs          parameters and multiply-accumulates (symbolic dims = 1 unless --input-shape)
    file_bytes            model size on disk
    reference_params, reference_macs, reference_file_bytes   the same for the reference, or null
    perplexity            with --metric perplexity: {"perplexity", "nll" (mean per token), "tokens"}, else null
    reference_perplexity  the same for the reference, or null

``--metric perplexity`` is for causal language models (an ``input_ids`` input, logits
``[batch, seq, vocab]``): ``--data`` is then an .npz of token ids, ``input_ids [sequences, tokens]``
and optionally ``attention_mask`` (0 = padding, not scored); tokenize outside onnxprune.
"""

from __future__ import annotations

import argparse

from .. import ir, runtime
from ..data import open_data
from ..measure import quality
from ..errors import OnnxPruneError
from . import fmt, options


def register(sub) -> None:
    p = sub.add_parser("eval", help="accuracy, fidelity to a reference, and size of a model on data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    p.add_argument("--data", required=True, metavar="DATA",
                   help="an .npz named after the model's inputs (+ optional int 'labels'), a folder of "
                        "images (class subfolders give labels), or 'random'")
    p.add_argument("--reference", metavar="ORIG", help="original model to measure fidelity against")
    options.add_input_shapes(p)
    p.add_argument("--metric", choices=["auto", "perplexity"], default="auto",
                   help="auto: accuracy with labels, fidelity with --reference; perplexity: next-token "
                        "perplexity of a causal LM on token ids (--data with 'input_ids')")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help="samples per run (default 64; 8 sequences with --metric perplexity)")
    options.add_json(p, "evaluation")
    options.add_runtime(p)
    options.add_images(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size is None:
        args.batch_size = 8 if args.metric == "perplexity" else 64
    if args.batch_size < 1:
        raise OnnxPruneError(f"--batch-size {args.batch_size}: must be at least 1")
    options.image_data(args, "data")
    json_out = options.json_path(args)
    shapes = options.input_shapes(args)
    model = ir.load(args.model)
    reference = ir.load(args.reference) if args.reference else None
    if reference is not None:
        quality.check_same_inputs(model, reference)
    if args.metric == "perplexity":
        report = _perplexity_report(args, model, reference, shapes)
    else:
        data = open_data(args.data, model.proto, shapes, num_random=64)
        report = quality.evaluate(model, data, reference, shapes, batch_size=args.batch_size,
                                  progress=fmt.progress)
    if report.accuracy is None and report.fidelity is None and report.perplexity is None:
        fmt.err.print("no 'labels' in the data and no --reference: accuracy and fidelity cannot be "
                      "computed; showing size only", soft_wrap=True)
    print_report(report)
    if json_out:
        fmt.write_json(json_out, {**report.to_json(), "runtime": runtime.current().to_json()})
    return 0


def _perplexity_report(args: argparse.Namespace, model, reference, shapes) -> quality.EvalReport:
    from ..measure import perplexity as ppl

    data = ppl.token_data(args.data, model.proto, shapes)
    models = [model] + ([reference] if reference is not None else [])
    measured = ppl.perplexities(models, data, batch_size=args.batch_size)
    params, macs, size = quality.size_stats(model, shapes)
    report = quality.EvalReport(model=quality.model_name(model, "model"), samples=data.num_samples,
                                 params=params, macs=macs, file_bytes=size, data=data.source,
                                 perplexity=measured[0])
    if reference is not None:
        report.reference = quality.model_name(reference, "reference")
        report.reference_perplexity = measured[1]
        report.reference_params, report.reference_macs, report.reference_file_bytes = \
            quality.size_stats(reference, shapes)
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _num(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _size(x: int | None) -> str:
    return "-" if x is None else fmt.human_bytes(x)


def print_report(r: quality.EvalReport) -> None:
    cols = ["", r.model] + ([r.reference] if r.reference else [])
    both = r.reference is not None
    rows = []
    if r.accuracy is not None:
        ref = r.reference_accuracy or {}
        rows.append(["top-1", _pct(r.accuracy["top1"])] + ([_pct(ref.get("top1"))] if both else []))
        rows.append(["top-5", _pct(r.accuracy["top5"])] + ([_pct(ref.get("top5"))] if both else []))
    if r.perplexity is not None:
        ref = r.reference_perplexity or {}
        rows.append(["perplexity", _num(r.perplexity["perplexity"])]
                    + ([_num(ref.get("perplexity"))] if both else []))
        rows.append(["tokens scored", str(r.perplexity["tokens"])] + ([str(ref.get("tokens"))] if both else []))
    rows.append(["params", fmt.human_count(r.params)] + ([fmt.human_count(r.reference_params)] if both else []))
    rows.append(["MACs", fmt.human_count(r.macs)] + ([fmt.human_count(r.reference_macs)] if both else []))
    rows.append(["file size", _size(r.file_bytes)] + ([_size(r.reference_file_bytes)] if both else []))
    fmt.out.print(f"{r.samples} samples from {r.data}", soft_wrap=True)
    fmt.table(None, cols, rows, right=range(1, len(cols)))
    if r.fidelity:
        fmt.table("fidelity vs reference", ["output", "top-1 agreement", "cosine", "max abs", "mean abs",
                                            "rel error"],
                  [[name, _pct(f["top1_agreement"]), _num(f["cosine"], ".6f"), _num(f["max_abs"]),
                    _num(f["mean_abs"]), _num(f["rel_error"])] for name, f in r.fidelity.items()],
                  right=range(1, 6))
