"""onnxprune finetune: recover a pruned model's accuracy by training its weights in onnxruntime.

Distils the original model (--teacher; its outputs are computed per batch) and,
when the data has labels, mixes in cross-entropy: loss = alpha * T^2 * KL + (1 - alpha) * CE.
Weights are updated with Adam (or SGD) from gradients computed by an ONNX gradient
graph; a held-out part of the data is evaluated every --eval-every steps and the
best checkpoint is saved with the pruned model's initializer names and shapes.

    onnxprune finetune pruned.onnx --teacher model.onnx --data train.npz -o tuned.onnx --steps 500
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train import finetune as ft
from .. import ir
from ..data import open_data
from ..errors import OnnxPruneError
from . import fmt, options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="train a pruned model's weights (distillation + labels); save the best",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_model(p)
    options.add_output(p)
    p.add_argument("--teacher", metavar="ORIG.onnx", help="the original model to distil from (needed without labels)")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="training data: an .npz (arrays named after the model inputs, optional int 'labels') "
                        "or a folder of images (class subfolders give labels)")
    options.add_training(p)
    options.add_json(p, "run summary")
    options.add_runtime(p)
    options.add_images(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "data")
    cfg = options.training_config(args, args.steps)
    json_path = options.json_path(args)
    out = Path(args.output)
    for other in (args.model, args.teacher):
        if other and out.exists() and Path(other).exists() and out.resolve() == Path(other).resolve():
            raise OnnxPruneError(f"{out}: output path is an input model; choose another -o path")
    student = ir.load(args.model)
    teacher = ir.load(args.teacher) if args.teacher else None
    data = open_data(args.data, student.proto, {})
    result = ft.finetune(student.proto, data, teacher=teacher.proto if teacher else None, config=cfg,
                         progress=fmt.progress, log=fmt.log)
    size = ir.save(result.proto, out, source=student.path, external=student.external)
    print_summary(result, out, size)
    if json_path:
        fmt.write_json(json_path, {"model": str(student.path), "teacher": args.teacher, "data": args.data,
                                   "output": str(out), **result.to_json()})
    return 0


def print_summary(result: ft.FinetuneResult, out: Path | None = None, size: int | None = None) -> None:
    pct = result.metric in ("top1", "agreement")

    def shown(v):
        return "-" if v is None else f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    s = result.seconds
    per_step = 1000 * (s.get("gradient", 0) + s.get("teacher", 0) + s.get("update", 0)) / max(result.steps, 1)
    rows = [(f"held-out {result.metric}", shown(result.before), shown(result.best),
             "input kept unchanged" if result.kept_input else f"best at step {result.best_step} of {result.steps}"),
            ("samples", "", f"{result.train_samples} train / {result.holdout_samples} held out", ""),
            ("time", "", f"{s.get('total', 0):.1f} s", f"{per_step:.1f} ms/step, loss {result.loss}")]
    fmt.table(None, ["", "before", "after", ""], rows, right=(1, 2))
    if result.decision:
        fmt.out.print(result.decision, soft_wrap=True, markup=False)
    if out is not None:
        fmt.out.print(f"wrote {out} ({fmt.human_bytes(size or 0)}), " + (
            "the input's weights unchanged" if result.kept_input else
            f"{len(result.trainable)} weight tensors trained"), soft_wrap=True)
