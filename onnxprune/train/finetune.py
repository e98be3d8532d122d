"""Fine-tune a (pruned) model in onnxruntime: distillation from the original, cross-entropy to labels.

    run = finetune(pruned, data, teacher=original, config=FinetuneConfig(steps=300, lr=1e-3))
    ir.save(run.proto, "out.onnx")          # the best checkpoint, same initializer names and shapes

One gradient graph (:mod:`onnxprune.train.autodiff`, weights as graph inputs, its
convolutions lowered to onnxruntime's blocked kernels by :mod:`~onnxprune.train.autodiff.nchwc`)
and one onnxruntime session are built once; the weights live as numpy arrays that Adam
or SGD (momentum) updates in place. Per batch the teacher's output comes from
its own session. The loss on the first output is

* labels and a teacher: ``alpha · T²·KL(teacher‖student at T) + (1 - alpha) · CE(labels)``
  (the autodiff's ``distill`` loss; ``alpha`` is fed, so it is one graph);
* no labels: ``T²·KL`` for ``[N, C]`` logits, the mean squared error for any other output;
* labels and no teacher (or ``alpha = 0``): ``CE``.

A held-out split of the data (``holdout``) is evaluated every ``eval_every`` steps
(top-1 accuracy with labels, else top-1 agreement with the teacher, else relative
error) with :mod:`onnxprune.measure.quality`. The best checkpoint is returned only when it beats step 0
by more than chance on that split (an exact sign test on the samples the two classify differently,
McNemar's test, at the 0.05 level); otherwise the input's weights are returned unchanged and
``decision`` says why (also when the split has under 300 samples: such decisions are noisy).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from .. import ir, runtime
from ..measure import quality
from .autodiff import build_gradient_model, differentiable
from .autodiff import nchwc
from ..data import ArrayData
from ..errors import OnnxPruneError
from ..measure.clock import stage_time

# parameters a fine-tune may change: op -> indices of its inputs that are weights (float, more than one value)
TRAINABLE: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,), "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1),
}
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "constant")


@dataclass
class FinetuneConfig:
    steps: int = 300
    lr: float = 1e-3
    batch_size: int = 64
    alpha: float = 0.5              # weight of distillation when there are labels
    temperature: float = 2.0
    optimizer: str = "adam"
    momentum: float = 0.9           # sgd
    weight_decay: float = 0.0       # decoupled (AdamW-style for adam)
    schedule: str = "cosine"        # learning rate: cosine decay to 0 over ``steps``, or constant
    holdout: float = 0.1            # fraction of the data held out for model selection
    eval_every: int = 50
    seed: int = 0

    def check(self, prefix: str = "") -> None:
        """Raise :class:`OnnxPruneError` for values out of range, naming the option (``--{prefix}lr``...)."""
        for name, v in (("lr", self.lr), ("alpha", self.alpha), ("temperature", self.temperature),
                        ("weight-decay", self.weight_decay), ("holdout", self.holdout)):
            if not math.isfinite(v):
                raise OnnxPruneError(f"--{prefix}{name} {v}: must be a finite number")
        bad = (("steps", self.steps < 0, "must be 0 or more"), ("lr", not self.lr > 0, "must be positive"),
               ("lr", self.lr > 10, "above 10 diverges; typical values are 1e-4 to 1e-2"),
               ("batch", self.batch_size < 1, "must be at least 1"),
               ("alpha", not 0.0 <= self.alpha <= 1.0, "must be in [0, 1]"),
               ("temperature", not self.temperature > 0, "must be positive"),
               ("optimizer", self.optimizer not in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
               ("schedule", self.schedule not in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
               ("weight-decay", self.weight_decay < 0, "must be 0 or more"),
               ("holdout", not 0.0 <= self.holdout < 1.0, "must be in [0, 1)"),
               ("eval-every", self.eval_every < 1, "must be at least 1"))
        for name, failed, msg in bad:
            if failed:
                raise OnnxPruneError(f"--{prefix}{name} {msg}")


@dataclass
class FinetuneResult:
    """The best checkpoint as a model, and how the run went (``to_json()`` for reports)."""

    proto: onnx.ModelProto
    loss: str                       # autodiff loss: distill, kl, cross_entropy or mse
    metric: str                     # top1, agreement or rel_error (lower is better)
    before: float | None            # held-out metric at step 0
    best: float | None
    best_step: int
    steps: int
    train_samples: int
    holdout_samples: int
    trainable: list[str]
    history: list[dict] = field(default_factory=list)     # {"step", "loss", metric} per evaluation
    seconds: dict[str, float] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    kept_input: bool = False        # no resolvable gain on the held-out set: the input's weights are returned
    decision: str = ""              # why the result is the best checkpoint or the input, in one sentence

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("proto")
        d["trainable"] = len(self.trainable)
        return d


# ------------------------------------------------------------------ what is trained
def trainable(proto: onnx.ModelProto, output: str | None = None) -> list[str]:
    """Float initializers with more than one value that :data:`TRAINABLE` ops read as weights
    (directly or through Identity) and whose gradient can be built."""
    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    alias = {n.output[0]: n.input[0] for n in g.node if n.op_type == "Identity" and n.input[0] in inits}
    usable = differentiable(proto, output)
    names = []
    for node in g.node:
        for i in TRAINABLE.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ():
            name = alias.get(node.input[i], node.input[i]) if i < len(node.input) else ""
            t = inits.get(name)
            if t is not None and t.data_type in _FLOATS and np.prod(t.dims) > 1 and name in usable:
                names.append(name)
    return list(dict.fromkeys(names))


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def with_weights(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``proto`` whose initializers named in ``values`` hold those arrays (same dtype)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for i, t in enumerate(out.graph.initializer):
        if t.name in values:
            dtype = ir.np_dtype(t.data_type)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(values[t.name].astype(dtype), t.name))
    return out


# ------------------------------------------------------------------ optimizers
class Optimizer:
    """Adam (Kingma & Ba) or SGD with momentum over numpy arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], cfg: FinetuneConfig):
        self.cfg, self.t = cfg, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()} if cfg.optimizer == "adam" else {}

    def lr(self) -> float:
        c = self.cfg
        if c.schedule == "constant" or c.steps == 0:
            return c.lr
        return c.lr * 0.5 * (1.0 + math.cos(math.pi * self.t / c.steps))

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        c, lr = self.cfg, self.lr()
        self.t += 1
        for k, p in params.items():
            g = grads[k]
            if c.weight_decay:
                p -= lr * c.weight_decay * p
            if c.optimizer == "adam":
                self.m[k] += (1 - 0.9) * (g - self.m[k])
                self.v[k] += (1 - 0.999) * (g * g - self.v[k])
                mh = self.m[k] / (1 - 0.9 ** self.t)
                vh = self.v[k] / (1 - 0.999 ** self.t)
                p -= lr * mh / (np.sqrt(vh) + 1e-8)
            else:
                self.m[k] = c.momentum * self.m[k] + g
                p -= lr * self.m[k]


# ------------------------------------------------------------------ the training graph
@dataclass
class _Trainer:
    """The gradient session, the teacher session and how to feed them one batch."""

    sess: object
    fetch: list[str]
    params: dict[str, np.ndarray]
    roles: dict[str, str]                      # "labels" / "teacher" / "alpha" -> graph input
    teacher: object | None
    teacher_output: str
    alpha: float
    inputs: list[str]

    def run(self, feed: dict[str, np.ndarray], labels: np.ndarray | None, seconds: dict) -> tuple[float, dict]:
        extra = {}
        if "teacher" in self.roles:
            with stage_time(seconds, "teacher"):
                extra[self.roles["teacher"]] = self.teacher.run([self.teacher_output], feed)[0]
        if "labels" in self.roles:
            extra[self.roles["labels"]] = labels
        if "alpha" in self.roles:
            extra[self.roles["alpha"]] = np.asarray(self.alpha, dtype=np.float32)
        with stage_time(seconds, "gradient"):
            out = self.sess.run(self.fetch, {**feed, **self.params, **extra})
        return float(out[0]), dict(zip(self.params, out[1:]))


def _loss_for(classification: bool, labels: bool, teacher: bool, alpha: float) -> str:
    if not classification:
        if not teacher:
            raise OnnxPruneError("the model's first output is not [N, C] class scores: fine-tuning it needs "
                                 "--teacher (the original model) to match")
        return "mse"
    if labels and (alpha == 0.0 or not teacher):
        return "cross_entropy"
    if not teacher:
        raise OnnxPruneError("the data has no 'labels' array: fine-tuning needs them or --teacher ORIGINAL.onnx")
    return "distill" if labels and alpha < 1.0 else "kl"


def _roles(gm) -> dict[str, str]:
    """Which extra graph input is which: int64 labels, the scalar alpha, the teacher's output."""
    roles = {}
    for vi in gm.proto.graph.input:
        if vi.name in gm.extra_inputs:
            t = vi.type.tensor_type
            role = "labels" if t.elem_type == onnx.TensorProto.INT64 else "alpha" if not t.shape.dim else "teacher"
            roles[role] = vi.name
    return roles


def _trainer(student: onnx.ModelProto, teacher: onnx.ModelProto | None, data: ArrayData,
             cfg: FinetuneConfig, batch: int) -> tuple[_Trainer, str]:
    output = student.graph.output[0].name
    sample = next(data.batches(batch))
    y = runtime.session(student).run([output], sample)[0]
    classification = y.ndim == 2 and y.shape[1] > 1
    loss = _loss_for(classification, data.labels is not None, teacher is not None, cfg.alpha)
    params = trainable(student, output)
    if not params:
        raise OnnxPruneError("the model has no weights to fine-tune (no float initializers feeding "
                             "Conv/Gemm/MatMul/norm layers on a differentiable path to its output)")
    gm = build_gradient_model(student, params, loss=loss, output=output, trainable_as_inputs=True,
                              temperature=cfg.temperature)
    t_sess, t_out = None, ""
    if teacher is not None and loss != "cross_entropy":
        quality.check_same_inputs(student, teacher)
        t_sess = runtime.session(teacher)
        names = [o.name for o in t_sess.outputs]
        t_out = output if output in names else names[0]
    params_values = {k: np.array(gm.param_values[k], copy=True) for k in gm.param_inputs}
    fetch = [gm.loss_name] + [gm.grad_names[k] for k in params_values]
    inputs = [vi.name for vi in ir.graph_inputs(student)]
    return _Trainer(runtime.session(nchwc.lower(gm.proto)), fetch, params_values, _roles(gm), t_sess, t_out, cfg.alpha,
                    inputs), loss


# ------------------------------------------------------------------ the loop
def split(data: ArrayData, holdout: float, seed: int) -> tuple[ArrayData, ArrayData | None]:
    """Shuffle ``data`` (seeded) and hold out the last ``holdout`` fraction (at least one sample)."""
    n = data.num_samples
    order = np.random.default_rng(seed).permutation(n)
    shuffled = ArrayData({k: v[order] for k, v in data.arrays.items()},
                         None if data.labels is None else data.labels[order], data.kind, data.source, data.meta)
    held = 0 if holdout == 0 else max(1, int(round(holdout * n)))
    if n - held < 1:
        raise OnnxPruneError(f"the data has {n} sample(s): too few to hold out {holdout:.0%} and train on the rest")
    if held == 0:
        return shuffled, None
    train, test = shuffled.split(n - held)
    return train, test


def _batches(data: ArrayData, size: int, seed: int):
    """Endless batches of ``size`` samples, reshuffled every epoch: (feed, labels)."""
    rng = np.random.default_rng(seed + 1)
    n = data.num_samples
    size = min(size, n)
    while True:
        order = rng.permutation(n)
        for s in range(0, n - size + 1, size):
            idx = np.sort(order[s:s + size])
            yield ({k: np.asarray(v[idx]) for k, v in data.arrays.items()},
                   None if data.labels is None else data.labels[idx])


@dataclass
class _Selector:
    """Evaluates checkpoints on held-out data and remembers the best weights."""

    proto: onnx.ModelProto
    teacher: onnx.ModelProto | None
    held: ArrayData | None
    batch_size: int
    metric: str = ""
    best: float | None = None
    best_step: int = 0
    best_values: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    truth: np.ndarray | None = None          # the teacher's top-1 per held-out sample (agreement)
    best_right: np.ndarray | None = None     # per held-out sample: right at the best checkpoint
    base_values: dict = field(default_factory=dict)
    base_right: np.ndarray | None = None     # ... and at step 0 (the input)

    def __post_init__(self):
        if self.held is not None:
            self.metric = "top1" if self.held.labels is not None else "agreement"

    def outcomes(self, model: onnx.ModelProto) -> np.ndarray | None:
        """Per held-out sample: is the top-1 class right (labels) or the teacher's (no labels)? None when the
        first output is not class scores."""
        preds = _top1(model, self.held, self.batch_size)
        if preds is None:
            return None
        if self.metric == "top1":
            return preds == self.held.labels
        if self.truth is None:
            self.truth = _top1(self.teacher, self.held, self.batch_size)
        return None if self.truth is None else preds == self.truth

    def evaluate(self, step: int, params: dict[str, np.ndarray], loss: float | None) -> float | None:
        if self.held is None:
            self.best_values, self.best_step = {k: v.copy() for k, v in params.items()}, step
            return None
        model = with_weights(self.proto, params)
        right = self.outcomes(model) if self.metric in ("top1", "agreement") else None
        if right is not None:
            value = float(right.mean())
        elif self.metric == "top1":
            value = quality.accuracy(model, self.held, self.batch_size)["top1"]
        else:
            fid = next(iter(quality.fidelity(model, self.teacher, self.held, self.batch_size).values()))
            if fid["top1_agreement"] is None:
                self.metric = "rel_error"
            value = fid["top1_agreement"] if self.metric == "agreement" else fid["rel_error"]
        self.history.append({"step": step, "loss": loss, self.metric: value})
        better = self.best is None or (value < self.best if self.metric == "rel_error" else value > self.best)
        if better:
            self.best, self.best_step = value, step
            self.best_values = {k: v.copy() for k, v in params.items()}
            self.best_right = right
        if step == 0:
            self.base_values, self.base_right = {k: v.copy() for k, v in params.items()}, right
        return value

    def decide(self, alpha: float = 0.05) -> tuple[bool, str]:
        """Keep the best checkpoint only if it beats step 0 by more than the held-out set can attribute to
        chance: an exact one-sided sign test on the samples the two disagree about (McNemar's test).
        Returns (keep the best checkpoint, the reason in one sentence)."""
        if self.held is None:
            return True, "no held-out data: the last checkpoint is returned untested"
        n = self.held.num_samples
        noisy = f" (only {n} held-out samples: a decision this small is noisy; hold out a few hundred)" \
            if n < 300 else ""
        if self.best_step == 0:
            return False, f"no checkpoint beat the input on {n} held-out samples{noisy}"
        if self.best_right is None or self.base_right is None:
            return True, f"best held-out {self.metric} at step {self.best_step} (not tested for chance){noisy}"
        gained = int((self.best_right & ~self.base_right).sum())
        lost = int((~self.best_right & self.base_right).sum())
        p = sign_test(gained, gained + lost)
        gain = 100 * (gained - lost) / n
        said = (f"step {self.best_step}: {gain:+.2f} points on {n} held-out samples ({gained} fixed, {lost} "
                f"broken; one-sided sign test p = {p:.2g})")
        if p < alpha:
            return True, f"kept the checkpoint of {said}{noisy}"
        return False, f"no resolvable gain, so the input's weights are kept: best was {said}, which chance " \
            f"explains at the {alpha:g} level{noisy}"


def sign_test(successes: int, trials: int) -> float:
    """P(X >= successes) for X ~ Binomial(trials, 1/2), exactly (1.0 when there are no trials)."""
    if trials == 0:
        return 1.0
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2 ** trials


def _top1(model: onnx.ModelProto, data: ArrayData, batch: int) -> np.ndarray | None:
    """The top-1 class of ``model``'s first output for every sample, or None if it is not ``[N, C]`` scores."""
    sess = runtime.session(model)
    name = sess.outputs[0].name
    preds = []
    for feed in data.batches(batch):
        y = np.asarray(sess.run([name], feed)[0])
        if y.ndim != 2 or y.shape[1] < 2:
            return None
        preds.append(np.argmax(y, axis=1))
    return np.concatenate(preds)


def finetune(student: onnx.ModelProto, data: ArrayData, *, teacher: onnx.ModelProto | None = None,
             config: FinetuneConfig | None = None, progress: Callable | None = None,
             log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Train ``student``'s weights on ``data`` (distilling ``teacher`` when given) and return the best
    checkpoint on the held-out split. ``progress(iterable, total, description)`` wraps the step loop;
    ``log`` receives one line per evaluation."""
    cfg = config or FinetuneConfig()
    cfg.check()
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    train, held = split(data, cfg.holdout, cfg.seed)
    batch = _fixed_batch(student) or min(cfg.batch_size, train.num_samples)
    if batch > train.num_samples:
        raise OnnxPruneError(f"the model's batch dimension is fixed at {batch}, larger than the "
                             f"{train.num_samples} training samples")
    with stage_time(seconds, "build"):
        trainer, loss_name = _trainer(student, teacher, train, cfg, batch)
    sel = _Selector(student, teacher, held, max(batch, 64))
    opt = Optimizer(trainer.params, cfg)
    with stage_time(seconds, "evaluate"):
        before = sel.evaluate(0, trainer.params, None)
    _say(log, sel, 0, None)
    steps = range(1, cfg.steps + 1)
    batches = _batches(train, batch, cfg.seed)
    running = None
    for step in progress(steps, cfg.steps, "fine-tuning") if progress else steps:
        feed, labels = next(batches)
        loss, grads = trainer.run(feed, labels, seconds)
        running = loss if running is None else 0.9 * running + 0.1 * loss
        with stage_time(seconds, "update"):
            opt.step(trainer.params, grads)
        if not math.isfinite(loss):
            raise OnnxPruneError(f"the loss became {loss} at step {step}; lower --lr")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with stage_time(seconds, "evaluate"):
                sel.evaluate(step, trainer.params, running)
            _say(log, sel, step, running)
    keep, decision = sel.decide()
    if log is not None:
        log(decision)
    seconds["total"] = round(time.perf_counter() - t0, 4)
    final = with_weights(student, sel.best_values) if keep else student
    return FinetuneResult(final, loss_name, sel.metric or "none", before,
                          sel.best if keep else before, sel.best_step if keep else 0, cfg.steps, train.num_samples,
                          0 if held is None else held.num_samples, list(trainer.params), sel.history,
                          seconds, asdict(cfg), kept_input=not keep, decision=decision)


def _say(log, sel: _Selector, step: int, loss: float | None) -> None:
    if log is None or not sel.history:
        return
    h = sel.history[-1]
    value = h[sel.metric]
    shown = f"{100 * value:.2f}%" if sel.metric in ("top1", "agreement") else f"{value:.4g}"
    best = " (best)" if sel.best_step == step else ""
    lossed = "" if loss is None else f"loss {loss:.4f}, "
    log(f"step {step}: {lossed}held-out {sel.metric} {shown}{best}")


def _fixed_batch(proto: onnx.ModelProto) -> int | None:
    dims = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    d = dims.pop() if len(dims) == 1 else None
    return d if isinstance(d, int) and d > 0 else None

