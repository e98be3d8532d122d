#!/usr/bin/env python3
"""Fashion-MNIST at about 0.25x MACs: reconstruction alone, then ``onnxprune finetune``, next to Torch-Pruning.

onnxprune side (this interpreter, the project venv):

1. ``onnxprune prune models/fmnist_resnet.onnx --target-macs 0.25 --calib models/fmnist_calib.npz
   --criterion C`` for each ``--criteria`` entry (least-squares reconstruction by default), test accuracy;
2. ``finetune()`` of that model for ``--steps`` Adam steps on the 60,000 TRAIN images read from the Debian
   package ``dataset-fashion-mnist`` (10 % held out to pick the best checkpoint), distilling the
   original (alpha, T) plus cross-entropy to the labels; test accuracy of the kept checkpoint;
3. gradient cost: one gradient batch (64 images, every trainable weight, the fine-tuning graph) against
   one forward batch of the deployed model, in CPU time on one thread and wall time on the default threads.

Torch-Pruning side (``--torch-python``, the ``tools`` extra: torch, torch-pruning; run as
``--torch-worker``): ``tools/fmnist_model.py`` with ``models/fmnist_resnet.pt``, ``MetaPruner`` with L2
group importance, the classifier ignored, the uniform ratio bisected to the same MACs fraction; then
PyTorch fine-tuning with the same split, the same batches in the same order, the same steps, optimizer,
schedule and loss, checkpoint picked on the same held-out images.

Writes ``docs/finetune.md`` (and ``--json``)::

    python tools/bench_finetune.py --data-dir /tmp/fmnist/usr/share/datasets/fashion-mnist --steps 600
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"      # --models replaces it (fmnist_resnet.onnx/.pt, fmnist_calib.npz, fmnist_test.npz)
MEAN, STD = 0.2860, 0.3530


# ------------------------------------------------------------------ shared by both sides
def read_images(data_dir: Path, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Normalised float32 [N, 1, 28, 28] images and int64 labels of a Fashion-MNIST idx split."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(data_dir / f"{prefix}-images-idx3-ubyte.gz", "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)
    with gzip.open(data_dir / f"{prefix}-labels-idx1-ubyte.gz", "rb") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8).astype(np.int64)
    images = ((raw.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    return images, labels


def split_and_batches(n: int, holdout: float, seed: int, batch: int, steps: int):
    """The held-out indices and the batch indices of every step, exactly as ``onnxprune.train.finetune`` draws them."""
    order = np.random.default_rng(seed).permutation(n)
    held = max(1, int(round(holdout * n)))
    train, test = order[: n - held], order[n - held:]
    rng = np.random.default_rng(seed + 1)
    out = []
    while len(out) < steps:
        perm = rng.permutation(len(train))
        for s in range(0, len(train) - batch + 1, batch):
            out.append(train[np.sort(perm[s:s + batch])])
    return test, out[:steps]


# ------------------------------------------------------------------ Torch-Pruning (torch venv)
def torch_worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    sys.path.insert(0, str(ROOT / "tools"))
    from fmnist_model import FmnistResNet

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = read_images(Path(args.data_dir), "train")
    test = np.load(MODELS / "fmnist_test.npz")
    tx, ty = torch.from_numpy(test["input"]), torch.from_numpy(test["labels"])

    def fresh():
        m = FmnistResNet()
        m.load_state_dict(torch.load(MODELS / "fmnist_resnet.pt"))
        return m.eval()

    def accuracy(model, xs, ys) -> float:
        model.eval()
        with torch.no_grad():
            hits = sum(int((model(xs[i:i + 500]).argmax(1) == ys[i:i + 500]).sum()) for i in range(0, len(xs), 500))
        return hits / len(xs)

    example = torch.randn(1, 1, 28, 28)
    base_macs, base_params = tp.utils.count_ops_and_params(fresh(), example)

    def pruned(ratio):
        m = fresh()
        pruner = tp.pruner.MetaPruner(m, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=ratio, ignored_layers=[m.fc])
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(m, example)
        return m, macs / base_macs, params / base_params

    lo, hi = 0.0, 0.95
    for _ in range(12):                                  # bisection on the uniform ratio to the MACs target
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pruned(mid)[1] > args.macs else (lo, mid)
    student, macs, params = pruned(hi)
    teacher = fresh()
    out = {"ratio": hi, "macs_kept": macs, "params_kept": params, "acc_unpruned": accuracy(teacher, tx, ty),
           "acc_pruned": accuracy(student, tx, ty)}
    held, batches = split_and_batches(len(x), args.holdout, args.seed, args.batch, args.steps)
    hx, hy = torch.from_numpy(x[held]), torch.from_numpy(y[held])
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / args.steps)))
    best, best_step, best_state = accuracy(student, hx, hy), 0, {k: v.clone() for k, v in student.state_dict().items()}
    t_train, t = 0.0, args.temperature
    for step, idx in enumerate(batches, start=1):
        xb, yb = torch.from_numpy(x[idx]), torch.from_numpy(y[idx])
        t0 = time.perf_counter()
        student.train()
        with torch.no_grad():
            soft = F.log_softmax(teacher(xb) / t, dim=1)
        logits = student(xb)
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), soft, log_target=True, reduction="batchmean") * t * t
        loss = args.alpha * kl + (1 - args.alpha) * F.cross_entropy(logits, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        t_train += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(student, hx, hy)
            if acc > best:
                best, best_step = acc, step
                best_state = {k: v.clone() for k, v in student.state_dict().items()}
    student.load_state_dict(best_state)
    out.update({"acc_finetuned": accuracy(student, tx, ty), "best_holdout": best, "best_step": best_step,
                "train_seconds": t_train, "ms_per_step": 1000 * t_train / max(args.steps, 1),
                "torch": torch.__version__, "torch_pruning": tp.__version__, "threads": torch.get_num_threads()})
    return out


# ------------------------------------------------------------------ onnxprune (project venv)
def prune_cli(criterion: str, macs: float, out: Path) -> dict:
    report = out.with_suffix(".json")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "prune", str(MODELS / "fmnist_resnet.onnx"),
                           "-o", str(out), "--target-macs", str(macs), "--criterion", criterion,
                           "--calib", str(MODELS / "fmnist_calib.npz"), "--report", str(report)],
                          capture_output=True, text=True, env={**os.environ, "ONNXPRUNE_NO_PROGRESS": "1"})
    if proc.returncode:
        raise SystemExit(f"onnxprune prune failed:\n{proc.stderr}")
    rep = json.loads(report.read_text())
    rep["wall_s"] = time.perf_counter() - t0
    return rep


def weights_as_inputs(proto, names: list[str]):
    """A copy of ``proto`` whose initializers ``names`` are graph inputs (as in the fine-tuning graph)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {t.name: t for t in out.graph.initializer}
    out.graph.input.extend(helper.make_tensor_value_info(n, inits[n].data_type, list(inits[n].dims)) for n in names)
    keep = [t for t in out.graph.initializer if t.name not in set(names)]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    return out


def _cost_sessions(proto, teacher, x: np.ndarray, y: np.ndarray) -> dict:
    """name -> run(): one batch through each graph whose time per batch is compared (see ``gradient_cost``)."""
    from onnxprune.train import finetune as ft
    from onnxprune import ir, runtime
    from onnxprune.analysis import analyze
    from onnxprune.train.autodiff import build_gradient_model
    from onnxprune.train.autodiff import nchwc
    from onnxprune.data import ArrayData
    from onnxprune.groups import ACTIVATION
    from onnxprune.importance.gradient import _with_products

    def sess(model):
        return runtime.session(model, spinning=False)

    cfg = ft.FinetuneConfig(steps=1000, batch_size=len(x))
    trainer, _ = ft._trainer(proto, teacher, ArrayData({"input": x}, y), cfg, len(x))
    opt = ft.Optimizer(trainer.params, cfg)
    params = list(trainer.params)
    fed = weights_as_inputs(proto, params)
    stem = next(n.output[0] for n in proto.graph.node if n.op_type == "Conv")
    data = build_gradient_model(fed, [stem], loss="distill", temperature=cfg.temperature)
    roles = ft._roles(data)
    teacher_y = trainer.teacher.run([trainer.teacher_output], {"input": x})[0]
    data_feed = {"input": x, **trainer.params, roles["labels"]: y, roles["teacher"]: teacher_y,
                 roles["alpha"]: np.asarray(cfg.alpha, np.float32)}
    an = analyze(ir.Model(proto))
    acts = sorted({(m.tensor, m.axis) for g in an.prunable for m in g.of_kind(ACTIVATION)})
    tm = build_gradient_model(proto, [t for t, _ in acts], loss="cross_entropy")
    taylor, products = _with_products(tm, acts, an.shapes, proto)
    taylor_feed = {"input": x, next(iter(tm.extra_inputs)): y}
    forward, fed_s, data_s, taylor_s = sess(proto), sess(nchwc.lower(fed)), sess(nchwc.lower(data.proto)), sess(taylor)
    seconds: dict = {}

    def step():
        _, grads = trainer.run({"input": x}, y, seconds)
        opt.step(trainer.params, grads)

    extra = {trainer.roles["labels"]: y, trainer.roles["teacher"]: teacher_y,
             trainer.roles["alpha"]: np.asarray(cfg.alpha, np.float32)}
    grad_feed = {"input": x, **trainer.params, **extra}
    return {"forward": lambda: forward.run(None, {"input": x}),
            "forward_fed": lambda: fed_s.run(None, {"input": x, **trainer.params}),
            "input_grads": lambda: data_s.run([data.grad_names[stem]], data_feed),
            "gradient": lambda: trainer.sess.run(trainer.fetch, grad_feed),
            "step": step,
            "taylor": lambda: taylor_s.run(list(products.values()), taylor_feed),
            "_gradient_model": (nchwc.lower(build_gradient_model(
                proto, params, loss="distill", trainable_as_inputs=True, temperature=cfg.temperature).proto),
                trainer.fetch, grad_feed)}


def gradient_cost(proto, teacher, x: np.ndarray, y: np.ndarray, rounds: int = 20) -> dict:
    """Time per batch of ``x`` (training images, labels ``y``) in interleaved rounds: each round runs every
    graph once, so load changes hit all alike; medians of wall time and of CPU time (all threads), onnxruntime's
    default threads. *forward*: the model's inference session; *forward_fed*: the same forward with the trainable
    weights fed as inputs (lowered to NCHWc as in fine-tuning); *input_grads*: that plus the loss and the input
    gradients back to the first conv's output; *gradient*: the fine-tuning session (loss, the gradient of every
    trainable weight); *step*: a whole fine-tuning step (teacher forward, gradient, Adam update); *taylor*: the
    ``--criterion taylor`` session (activation gradients, weights constant, Σ a·g per channel). Ratios are
    wall per batch against *forward* on the same batch. ``profile``: onnxruntime's profiler on the gradient
    session, kernel time per op type (ms per batch)."""
    runs = _cost_sessions(proto, teacher, x, y)
    grad_model = runs.pop("_gradient_model")
    for fn in runs.values():
        fn()
    wall = {k: [] for k in runs}
    cpu = {k: [] for k in runs}
    load0 = os.getloadavg()[0]
    for _ in range(rounds):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    from onnxprune.train.autodiff import nchwc

    out = {"batch": len(x), "rounds": rounds, "load": [load0, os.getloadavg()[0]], "cpu": _cpu_name(),
           "cores": os.cpu_count(), "nchwc_block": nchwc.block_size()}
    for name in runs:
        out[f"{name}_wall_ms"] = 1000 * float(np.median(wall[name]))
        out[f"{name}_cpu_ms"] = 1000 * float(np.median(cpu[name]))
        out[f"{name}_ratio"] = out[f"{name}_wall_ms"] / out["forward_wall_ms"]
    out["profile"] = profile_ops(*grad_model)
    return out


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or "?"
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "?")


def profile_ops(model, fetch, feed, runs: int = 5) -> dict:
    """Kernel milliseconds per run by op type, from onnxruntime's profiler (default threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as d:
        so.profile_file_prefix = os.path.join(d, "prof")
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            sess.run(fetch, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            totals[op] = totals.get(op, 0.0) + e["dur"] / 1000 / runs
    return {k: round(v, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def onnxprune_side(args: argparse.Namespace, tmp: Path) -> dict:
    import onnx

    from onnxprune.train import finetune as ft
    from onnxprune.measure import quality
    from onnxprune.data import ArrayData, load_npz

    original = onnx.load(MODELS / "fmnist_resnet.onnx")
    test = load_npz(MODELS / "fmnist_test.npz", original)
    x, y = read_images(Path(args.data_dir), "train")
    train = ArrayData({"input": x}, y, source="fashion-mnist train")
    xb, yb = x[:args.batch], y[:args.batch]
    cost = (lambda m: None) if args.skip_costs else (lambda m: gradient_cost(m, original, xb, yb, args.cost_rounds))
    res = {"acc_unpruned": quality.accuracy(original, test)["top1"], "cost_unpruned": cost(original), "runs": {}}
    for crit in args.criteria.split(","):
        path = tmp / f"{crit}.onnx"
        rep = prune_cli(crit, args.macs, path)
        pruned = onnx.load(path)
        run = {"macs_kept": rep["macs_after"] / rep["macs_before"], "params_kept": rep["params_after"] / rep["params_before"],
               "prune_s": rep["wall_s"], "reconstruct": rep.get("reconstruct_mode"),
               "acc_reconstructed": quality.accuracy(pruned, test)["top1"]}
        cfg = ft.FinetuneConfig(steps=args.steps, lr=args.lr, batch_size=args.batch, alpha=args.alpha,
                                temperature=args.temperature, holdout=args.holdout, eval_every=args.eval_every,
                                seed=args.seed)
        t0 = time.perf_counter()
        tuned = ft.finetune(pruned, train, teacher=original, config=cfg, log=lambda s: print(f"  [{crit}] {s}"))
        run["finetune_s"] = time.perf_counter() - t0
        run["finetune"] = tuned.to_json()
        run["ms_per_step"] = 1000 * sum(tuned.seconds.get(k, 0) for k in ("teacher", "gradient", "update")) / args.steps
        run["acc_finetuned"] = quality.accuracy(tuned.proto, test)["top1"]
        run["cost"] = cost(pruned)
        res["runs"][crit] = run
        print(f"{crit}: reconstructed {run['acc_reconstructed']:.4f} -> fine-tuned {run['acc_finetuned']:.4f}")
    return res


def costs_into(args: argparse.Namespace, path: Path) -> dict:
    """Measure only the per-batch costs (models pruned again as in the saved run) into the saved JSON."""
    import onnx

    saved = json.loads(path.read_text())
    original = onnx.load(MODELS / "fmnist_resnet.onnx")
    x, y = read_images(Path(args.data_dir), "train")
    xb, yb = x[:args.batch], y[:args.batch]
    ours = saved["onnxprune"]
    ours["cost_unpruned"] = gradient_cost(original, original, xb, yb, args.cost_rounds)
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        for crit, run in ours["runs"].items():
            out = Path(tmp) / f"{crit}.onnx"
            prune_cli(crit, saved["args"]["macs"], out)
            run["cost"] = gradient_cost(onnx.load(out), original, xb, yb, args.cost_rounds)
    path.write_text(json.dumps(saved, indent=2))
    return saved


def torch_side(args: argparse.Namespace, macs: float) -> dict | None:
    cmd = [args.torch_python, str(Path(__file__).resolve()), "--torch-worker", "--macs", str(macs)]
    for k in ("models", "data_dir", "steps", "lr", "batch", "alpha", "temperature", "holdout", "eval_every", "seed", "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(f"Torch-Pruning side failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ report
def markdown(args: argparse.Namespace, ours: dict, theirs: dict | None, load: tuple) -> str:
    note = [f"Note: {ours['note']}", ""] if ours.get("note") else []
    return "\n".join(_intro(args) + _results(args, ours, theirs, load) + note + _costs(ours) + _how()
                     + [f"Software: onnxruntime {ours.get('ort', '?')}, Python {platform.python_version()}"
                        + (f"; torch {theirs['torch']}, torch-pruning {theirs['torch_pruning']} "
                           f"({theirs['threads']} threads)" if theirs else "") + ".", ""])


def _intro(args) -> list[str]:
    imgs = args.steps * args.batch
    return [
        "# Fine-tuning after pruning", "",
        "`onnxprune finetune` trains a pruned model's weights in onnxruntime, distilling the original model",
        "and, when the data has labels, fitting them too; `onnxprune prune --finetune-steps N` runs it as the",
        "last step of pruning, so score, prune, reconstruct, fine-tune and validate are one command:", "",
        "```sh",
        "onnxprune finetune pruned.onnx --teacher model.onnx --data train.npz -o tuned.onnx \\",
        "    --steps 600 --lr 1e-3 --batch 64 --alpha 0.5 --temperature 2",
        "onnxprune prune model.onnx -o small.onnx --target-macs 0.25 --calib calib.npz \\",
        "    --finetune-steps 600 --finetune-data train.npz --data test.npz",
        "```", "",
        "```python",
        "from onnxprune.train.finetune import FinetuneConfig, finetune",
        "run = finetune(pruned_proto, train_data, teacher=original_proto, config=FinetuneConfig(steps=600))",
        "run.proto          # the best checkpoint: same initializer names, shapes and dtypes",
        "run.history        # [{'step', 'loss', 'top1'}, ...] every --eval-every steps",
        "```", "",
        "## Measured on the sample model", "",
        "Generated by `tools/bench_finetune.py`. The Fashion-MNIST sample model (`models/fmnist_resnet.onnx`,",
        f"see `models/README.md`) is pruned to about {args.macs:.2f}x MACs, then fine-tuned for a fixed budget of",
        f"**{args.steps} steps of {args.batch} training images** ({imgs:,} images, {imgs / 60000:.2f} epochs) drawn",
        f"from the 60,000 TRAIN images (Debian package `dataset-fashion-mnist`), of which {args.holdout:.0%} are",
        f"held out to pick the best checkpoint (evaluated every {args.eval_every} steps). Accuracy is top-1 on all",
        "10,000 TEST images, which are never used for training or selection. Regenerate with",
        f"`python tools/bench_finetune.py --data-dir DIR --steps {args.steps} --eval-every {args.eval_every} "
        "--json docs/finetune.json` (the Debian package's `usr/share/datasets/fashion-mnist` as DIR; "
        "`--from-json docs/finetune.json` only re-renders this page; `--skip-costs`, then `--costs-into "
        "docs/finetune.json` alone under a benchmark lock, keeps the per-batch timing apart from the long run).", "",
        f"Both sides: Adam, learning rate {args.lr} with cosine decay to 0, loss",
        f"`{args.alpha}·T²·KL(teacher‖student, T={args.temperature}) + {1 - args.alpha:g}·CE(labels)` with the",
        "unpruned model as the teacher, the same split and the same batches in the same order, no augmentation.",
        "onnxprune prunes with `--target-macs` and its default least-squares reconstruction from",
        "`models/fmnist_calib.npz` (512 TRAIN images), then trains the ONNX initializers (BatchNorm is folded",
        "into the convolutions by the exporter: conv weights and biases, the classifier). Torch-Pruning prunes",
        "`models/fmnist_resnet.pt` with L2 group importance (`MetaPruner`, uniform ratio bisected to the same",
        "MACs fraction, classifier ignored; it has no reconstruction step) and fine-tunes it with PyTorch in",
        "train mode (BatchNorm statistics update).", ""]


def _results(args, ours: dict, theirs: dict | None, load: tuple) -> list[str]:
    base = ours["acc_unpruned"]

    def pct(a):
        return f"{100 * a:.2f} %"

    def drop(a):
        return f"{100 * (a - base):+.2f}"
    lines = ["| model | MACs kept | params kept | test top-1 | vs unpruned (points) | steps | time |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| unpruned (onnxruntime) | 1.000 | 1.000 | {pct(base)} | | | |"]
    for crit, r in ours["runs"].items():
        f = r["finetune"]
        lines.append(f"| onnxprune `--criterion {crit}` + reconstruction (`{r['reconstruct']}`) | {r['macs_kept']:.3f} | "
                     f"{r['params_kept']:.3f} | {pct(r['acc_reconstructed'])} | {drop(r['acc_reconstructed'])} | 0 | "
                     f"{r['prune_s']:.0f} s (prune) |")
        lines.append(f"| … + `onnxprune finetune` (best at step {f['best_step']}) | {r['macs_kept']:.3f} | "
                     f"{r['params_kept']:.3f} | **{pct(r['acc_finetuned'])}** | {drop(r['acc_finetuned'])} | "
                     f"{args.steps} | {r['finetune_s']:.0f} s ({r['ms_per_step']:.0f} ms/step) |")
    if theirs:
        lines.append(f"| Torch-Pruning L2, ratio {theirs['ratio']:.3f} (no reconstruction) | {theirs['macs_kept']:.3f} | "
                     f"{theirs['params_kept']:.3f} | {pct(theirs['acc_pruned'])} | {drop(theirs['acc_pruned'])} | 0 | |")
        lines.append(f"| … + PyTorch fine-tuning (best at step {theirs['best_step']}) | {theirs['macs_kept']:.3f} | "
                     f"{theirs['params_kept']:.3f} | **{pct(theirs['acc_finetuned'])}** | "
                     f"{drop(theirs['acc_finetuned'])} | {args.steps} | {theirs['train_seconds']:.0f} s "
                     f"({theirs['ms_per_step']:.0f} ms/step) |")
    else:
        lines.append("| Torch-Pruning | | | not run (`--torch-python` missing or failed) | | | |")
    best = max(r["acc_finetuned"] for r in ours["runs"].values())
    met = "met" if base - best <= 0.015 else "**not met**"
    speed = []
    if theirs and theirs["acc_pruned"] < 0.2:
        speed += [f"Torch-Pruning's model is at chance ({pct(theirs['acc_pruned'])}) between pruning and "
                  "fine-tuning: it has no reconstruction step; onnxprune's least-squares reconstruction alone "
                  "keeps it within a few points.", ""]
    if theirs:
        ours_ms = min(r["ms_per_step"] for r in ours["runs"].values())
        ratio = ours_ms / theirs["ms_per_step"]
        faster = (f"PyTorch is {ratio:.1f}x faster than onnxprune" if ratio >= 1
                  else f"onnxprune is {1 / ratio:.1f}x faster than PyTorch")
        speed += [f"Per training step {faster} ({theirs['ms_per_step']:.0f} ms against {ours_ms:.0f} ms); "
                  "most of an onnxprune step is the weight gradients (next section).", ""]
    for crit, r in list(ours["runs"].items())[:1]:
        sec = r["finetune"]["seconds"]
        per = {k: 1000 * sec.get(k, 0) / args.steps for k in ("teacher", "gradient", "update")}
        speed += [f"An onnxprune step (`{crit}` model): teacher forward {per['teacher']:.0f} ms, gradient graph "
                  f"{per['gradient']:.0f} ms, numpy Adam update {per['update']:.1f} ms; the {len(r['finetune']['history'])} "
                  f"held-out evaluations took {sec.get('evaluate', 0):.0f} s in all.", ""]
    return lines + [
        "", f"Target: within 1.5 points of the unpruned model after fine-tuning — {met} "
        f"(best: {drop(best)} points).", ""] + speed + [
        "The onnxprune time is the whole `finetune()` call: building the gradient graph, the teacher's forward "
        "pass per batch, the gradient runs, the numpy Adam updates and the held-out evaluations; ms/step counts "
        "the teacher, gradient and update parts only. The Torch-Pruning time counts its training steps (teacher "
        "forward, forward, backward, update). The machine is a shared 2-core VM (load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end), so times are indicative only.", ""]


def _costs(ours: dict) -> list[str]:
    costs = [("unpruned", ours["cost_unpruned"])] + [(f"pruned (`{c}`)", r["cost"]) for c, r in ours["runs"].items()]
    if any(c is None for _, c in costs):
        return ["## Gradient cost per batch", "", "Not measured in this run (`--skip-costs`; `--costs-into` adds it).", ""]
    first = costs[0][1]
    loads = [v for _, c in costs for v in c["load"]]

    def cell(c, k, ratio=False):
        text = f"{c[k + '_wall_ms']:.1f} ms ({c[k + '_cpu_ms']:.0f})"
        return text + f" | {c[k + '_ratio']:.2f}x" if ratio else text
    lines = ["## Gradient cost per batch", "",
             "The ratio is the wall time of one run of a gradient session over one run of the model's inference",
             "session (`onnxprune.runtime.session`: all graph optimizations, onnxruntime's default threads) on the",
             f"same batch of {first['batch']} training images. In each of {first['rounds']} interleaved rounds every "
             "graph below runs once, so load changes hit all alike; medians, CPU time of all threads in parentheses.",
             f"Machine: {first.get('cpu', '?')}, {first.get('cores', '?')} cores (a VM shared with other jobs; load "
             f"average {min(loads):.1f}-{max(loads):.1f} during the timing); onnxruntime's NCHWc block: "
             f"{first.get('nchwc_block', '?')} channels.",
             "",
             "*forward, weights fed*: the forward pass with the trainable weights fed as inputs, as in fine-tuning;",
             "*+ input gradients*: that plus the loss and the gradients flowing back to the first convolution's output;",
             "*gradient*: the fine-tuning session (loss and the gradient of every trainable weight); *step*: a whole",
             "fine-tuning step (`_Trainer.run` with the teacher's forward pass, then the Adam update); *taylor*: the",
             "`--criterion taylor` session (activation gradients, constant weights, Σ a·g per channel in the graph).", "",
             "| model | forward | forward, weights fed | + input gradients | gradient | ratio | step | ratio | taylor | ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in costs:
        lines.append(f"| {name} | {cell(c, 'forward')} | {cell(c, 'forward_fed')} | {cell(c, 'input_grads')} | "
                     f"{cell(c, 'gradient', True)} | {cell(c, 'step', True)} | {cell(c, 'taylor', True)} |")
    worst = max(c["gradient_ratio"] for _, c in costs)
    worst_taylor = max(c["taylor_ratio"] for _, c in costs)

    def verdict(r):
        return "met" if r <= 3.0 else "**not met**"
    lines += ["", f"Target: gradient computation per batch no slower than 3x a forward pass — the `taylor` "
              f"gradients: {verdict(worst_taylor)} (worst {worst_taylor:.2f}x); the fine-tuning gradients: "
              f"{verdict(worst)} (worst {worst:.2f}x).", ""]
    name, c = costs[-1]
    fwd = c["forward_wall_ms"]
    parts = [("forward with fed weights", c["forward_fed_wall_ms"]),
             ("input gradients", c["input_grads_wall_ms"] - c["forward_fed_wall_ms"]),
             ("weight gradients", c["gradient_wall_ms"] - c["input_grads_wall_ms"])]
    lines += [f"Where the fine-tuning gradient goes ({name}, differences of the columns above, in forward passes): "
              + "; ".join(f"{k} {v:.1f} ms = {v / fwd:.1f}x" for k, v in parts) + ".", ""]
    prof = c.get("profile") or {}
    if prof:
        total = sum(prof.values())
        lines += [f"onnxruntime's profiler on the same session (kernel time per batch, {total:.0f} ms in all): "
                  + ", ".join(f"{op} {ms:.1f} ms ({100 * ms / total:.0f} %)" for op, ms in list(prof.items())[:8])
                  + ".", ""]
    return lines


def _how() -> list[str]:
    return [
        "## How it works, and where the time goes", "",
        "* **One graph, one session.** `onnxprune.train.autodiff.build_gradient_model(..., trainable_as_inputs=True)`",
        "  turns the trainable initializers into graph inputs and appends the loss and the backward pass; one",
        "  onnxruntime session runs it every step with the current numpy weights (fed without a copy). Adam (or",
        "  SGD with momentum) updates the float32 arrays in place; the learning rate decays with a cosine to 0",
        "  (`--schedule constant` keeps it). The best held-out checkpoint (step 0 included: fine-tuning never",
        "  returns a worse model than it got) is written back into the pruned model's initializers.",
        "* **One combined loss.** `distill` is `alpha·T²·KL + (1 − alpha)·CE` with `alpha` a scalar graph input,",
        "  so each step is one forward and one backward pass. Without labels the loss is `T²·KL` (logits) or the",
        "  mean squared error to the teacher (any other output); with labels and no teacher (or `alpha = 0`),",
        "  cross-entropy. The teacher's logits come from its own session, once per batch.",
        "* **What is trained.** Float initializers with more than one value that Conv, ConvTranspose, Gemm,",
        "  MatMul, the norms (scale, bias), PRelu or Add/Sub/Mul read (also through an Identity), and whose",
        "  gradient can be built. BatchNorm running statistics, scalars and `Constant` nodes stay fixed.",
        "* **Convolutions on the fast kernels.** onnxruntime runs a Conv on its blocked NCHWc kernels only when",
        "  the weight is a constant it can re-lay out once; a fed weight falls back to im2col + GEMM, about twice",
        "  as slow. `onnxprune.train.autodiff.nchwc.lower` rewrites every ungrouped 2-D Conv whose weight is fed (the",
        "  forward convolutions and the input gradients' convolutions with the flipped kernel) into",
        "  `com.microsoft.nchwc.Conv` with the re-layout as a few small graph nodes on the weight; the block size",
        "  is asked of onnxruntime (16 with AVX-512, 8 with AVX2; nothing changes where there are no NCHWc",
        "  kernels). Convolutions whose input channels are not whole blocks keep the plain Conv, as onnxruntime",
        "  itself does. Stride-2 input gradients stay ConvTranspose.",
        "* **Weight gradients are the floor.** Per kernel tap, a strided Slice of the input and one MatMul that",
        "  contracts samples and positions (a first layer with fewer than 8 input channels: the taps",
        "  concatenated and one batched MatMul, about 4x faster there). On this model's layer shapes this was",
        "  measured against a Conv with the batch as channels (plain and NCHWc), one-hot depthwise im2col, one",
        "  large GEMM in both operand orders, channels-last taps with one GEMM, taps chunked over samples to stay",
        "  in cache, and shifted copies of the output gradient with one batched GEMM: none was faster beyond",
        "  noise. The contraction is a GEMM with a small output ([M, 9C]) and a long inner dimension (samples x",
        "  positions); alone, without building its operands, onnxruntime's GEMM (and OpenBLAS's) takes about as",
        "  long for it as the whole forward convolution takes on the NCHWc kernels, and building the operands",
        "  (nine shifted copies of an activation per layer) costs as much again, so the weight gradients alone",
        "  cost several forward passes (numbers above) and a fine-tuning gradient cannot reach 3x on",
        "  onnxruntime's kernels. Also measured and dropped: stride-2 input gradients as one stride-1 Conv of all",
        "  phases plus DepthToSpace (twice as slow as ConvTranspose), and onnxruntime's parallel executor.",
        "* **Taylor.** Only `Σ a·∂L/∂a` per sample and channel leaves the session (a Mul and a ReduceSum per",
        "  activation in the graph; a Relu's sole input shares the Relu output's sum, equal element by element),",
        "  not the activations and their gradients: per batch the criterion's numpy work shrinks to a sum over",
        "  samples. Gradient outputs are renamed backward tensors, not Identity copies.", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                   help="folder with the Fashion-MNIST idx files (Debian package dataset-fashion-mnist)")
    p.add_argument("--criteria", default="l2,taylor")
    p.add_argument("--macs", type=float, default=0.25)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--holdout", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (onnxruntime uses its default)")
    p.add_argument("--cost-rounds", type=int, default=20, help="interleaved rounds of the per-batch timing")
    p.add_argument("--torch-python", default="/work/zoo-venv/bin/python")
    p.add_argument("--models", default=str(ROOT / "models"), help="folder with the sample model files")
    p.add_argument("--doc", default=str(ROOT / "docs" / "finetune.md"))
    p.add_argument("--json")
    p.add_argument("--from-json", metavar="PATH", help="only re-write --doc from a saved --json")
    p.add_argument("--skip-costs", action="store_true", help="no per-batch timing (measure it later, alone)")
    p.add_argument("--costs-into", metavar="PATH",
                   help="only measure the per-batch costs into a saved --json (under a benchmark lock), re-write --doc")
    p.add_argument("--torch-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    global MODELS
    MODELS = Path(args.models)
    if args.torch_worker:
        print(json.dumps(torch_worker(args)))
        return
    if args.from_json or args.costs_into:
        saved = (costs_into(args, Path(args.costs_into)) if args.costs_into
                 else json.loads(Path(args.from_json).read_text()))
        Path(args.doc).write_text(markdown(argparse.Namespace(**saved["args"]), saved["onnxprune"],
                                           saved["torch_pruning"], tuple(saved["load"])))
        return
    import onnxruntime

    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        ours = onnxprune_side(args, Path(tmp))
    ours["ort"] = onnxruntime.__version__
    macs = next(iter(ours["runs"].values()))["macs_kept"]
    theirs = torch_side(args, macs) if args.torch_python and Path(args.torch_python).exists() else None
    load = (load0, os.getloadavg()[0])
    Path(args.doc).write_text(markdown(args, ours, theirs, load))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "onnxprune": ours, "torch_pruning": theirs,
                                               "load": load}, indent=2))
    print(f"wrote {args.doc}")


if __name__ == "__main__":
    main()
