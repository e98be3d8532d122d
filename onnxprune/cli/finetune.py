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
import sys
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
    add_training_options(p)
    options.add_json(p, "run summary")
    options.add_runtime(p)
    options.add_images(p)
    p.set_defaults(func=run)


def add_training_options(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The optimisation options; ``prefix`` (e.g. ``finetune-``) namespaces them inside other commands."""
    d = ft.FinetuneConfig()
    g = p.add_argument_group("fine-tuning (with --finetune-steps)" if prefix else "training")
    if not prefix:
        g.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    g.add_argument(f"--{prefix}lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    g.add_argument(f"--{prefix}batch", type=int, default=d.batch_size, help=f"batch size (default {d.batch_size})")
    g.add_argument(f"--{prefix}alpha", type=float, default=d.alpha,
                   help=f"weight of distillation against labels, in [0, 1] (default {d.alpha})")
    g.add_argument(f"--{prefix}temperature", type=float, default=d.temperature,
                   help=f"softmax temperature of the distillation loss (default {d.temperature})")
    g.add_argument(f"--{prefix}optimizer", default=d.optimizer, choices=ft.OPTIMIZERS, help="default adam")
    g.add_argument(f"--{prefix}weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay")
    g.add_argument(f"--{prefix}schedule", default=d.schedule, choices=ft.SCHEDULES,
                   help="learning rate schedule (default cosine decay to 0)")
    g.add_argument(f"--{prefix}holdout", type=float, default=d.holdout,
                   help=f"fraction of the data held out to pick the best checkpoint (default {d.holdout})")
    g.add_argument(f"--{prefix}eval-every", type=int, default=d.eval_every,
                   help=f"evaluate the held-out part every N steps (default {d.eval_every})")
    g.add_argument(f"--{prefix}seed", type=int, default=d.seed, help="shuffling seed")


def config_from(args: argparse.Namespace, steps: int, prefix: str = "") -> ft.FinetuneConfig:
    def get(name):
        return getattr(args, (prefix + name).replace("-", "_"))
    cfg = ft.FinetuneConfig(steps=steps, lr=get("lr"), batch_size=get("batch"), alpha=get("alpha"),
                            temperature=get("temperature"), optimizer=get("optimizer"),
                            weight_decay=get("weight-decay"), schedule=get("schedule"), holdout=get("holdout"),
                            eval_every=get("eval-every"), seed=get("seed"))
    cfg.check(prefix)
    return cfg


def log(line: str) -> None:
    print(line, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    options.image_data(args, "data")
    cfg = config_from(args, args.steps)
    json_path = options.json_path(args)
    out = Path(args.output)
    for other in (args.model, args.teacher):
        if other and out.exists() and Path(other).exists() and out.resolve() == Path(other).resolve():
            raise OnnxPruneError(f"{out}: output path is an input model; choose another -o path")
    student = ir.load(args.model)
    teacher = ir.load(args.teacher) if args.teacher else None
    data = open_data(args.data, student.proto, {})
    result = ft.finetune(student.proto, data, teacher=teacher.proto if teacher else None, config=cfg,
                         progress=fmt.progress, log=log)
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
             f"best at step {result.best_step} of {result.steps}"),
            ("samples", "", f"{result.train_samples} train / {result.holdout_samples} held out", ""),
            ("time", "", f"{s.get('total', 0):.1f} s", f"{per_step:.1f} ms/step, loss {result.loss}")]
    fmt.table(None, ["", "before", "after", ""], rows, right=(1, 2))
    if out is not None:
        fmt.out.print(f"wrote {out} ({fmt.human_bytes(size or 0)}), {len(result.trainable)} weight tensors trained")
