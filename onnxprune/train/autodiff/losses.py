"""Scalar losses on one model output, each with its gradient with respect to that output in closed form.

A loss appends nodes computing the loss value and ``seed = d loss / d output``
(the start of the backward pass), and declares the extra graph inputs it
reads (``labels`` for cross-entropy, ``teacher`` for distillation losses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from ...errors import OnnxPruneError
from .emit import Emitter, Shape


@dataclass
class LossParts:
    loss: str
    seed: str
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)


@dataclass
class LossInput:
    """The output a loss is computed on, and how to name the extra inputs it needs."""

    name: str
    shape: Shape
    fresh_input: Callable[[str], str]
    temperature: float = 1.0


def _logits(out: LossInput, loss: str) -> int:
    """Class count of [N, C] logits; other ranks are refused."""
    if len(out.shape) != 2 or out.shape[1] is None:
        raise OnnxPruneError(
            f"loss '{loss}' needs [N, C] logits with a known class count; output '{out.name}' has shape "
            f"{out.shape} (choose another output, or use loss 'mse')")
    return int(out.shape[1])


def _batch_size(e: Emitter, x: str) -> str:
    return e.cast_float(e.op("Gather", [e.shape_of(x), e.const(0, np.int64)]))


def _teacher(e: Emitter, out: LossInput, descriptions: dict[str, str], what: str) -> tuple[str, onnx.ValueInfoProto]:
    name = out.fresh_input("teacher")
    descriptions[name] = f"{e.dtype.name} {out.shape}: {what}"
    return name, helper.make_tensor_value_info(name, e.elem_type, out.shape)


def cross_entropy(e: Emitter, out: LossInput) -> LossParts:
    """Mean over the batch of -log softmax(logits)[label]; labels are an int64 [N] input."""
    classes = _logits(out, "cross_entropy")
    labels = out.fresh_input("labels")
    onehot = e.cast_float(e.op("Equal", [e.unsqueeze(labels, [1]), e.ints(range(classes))]))
    logp = e.op("LogSoftmax", [out.name], axis=1)
    batch = _batch_size(e, out.name)
    total = e.op("Neg", [e.reduce_sum(e.op("Mul", [onehot, logp]), None, keepdims=False)])
    loss = e.op("Div", [total, batch])
    seed = e.op("Div", [e.op("Sub", [e.op("Exp", [logp]), onehot]), batch])
    info = helper.make_tensor_value_info(labels, TensorProto.INT64, out.shape[:1])
    return LossParts(loss, seed, [info], {labels: f"int64 [{out.shape[0] or 'N'}]: class index of each sample"})


def kl(e: Emitter, out: LossInput) -> LossParts:
    """T^2 * batch-mean KL(softmax(teacher/T) || softmax(student/T)), Hinton's distillation loss."""
    _logits(out, "kl")
    descriptions: dict[str, str] = {}
    teacher, info = _teacher(e, out, descriptions, "the teacher's logits")
    t = out.temperature
    inv_t = e.const(1.0 / t)
    log_q = e.op("LogSoftmax", [e.op("Mul", [out.name, inv_t])], axis=1)
    log_p = e.op("LogSoftmax", [e.op("Mul", [teacher, inv_t])], axis=1)
    p = e.op("Exp", [log_p])
    batch = _batch_size(e, out.name)
    divergence = e.reduce_sum(e.op("Mul", [p, e.op("Sub", [log_p, log_q])]), None, keepdims=False)
    loss = e.op("Mul", [e.op("Div", [divergence, batch]), e.const(t * t)])
    seed = e.op("Mul", [e.op("Div", [e.op("Sub", [e.op("Exp", [log_q]), p]), batch]), e.const(t)])
    return LossParts(loss, seed, [info], descriptions)


def mse(e: Emitter, out: LossInput) -> LossParts:
    """Mean over all elements of (output - teacher)^2."""
    descriptions: dict[str, str] = {}
    teacher, info = _teacher(e, out, descriptions, "the teacher's output")
    diff = e.op("Sub", [out.name, teacher])
    count = e.cast_float(e.op("Size", [out.name]))
    loss = e.op("Div", [e.reduce_sum(e.op("Mul", [diff, diff]), None, keepdims=False), count])
    seed = e.op("Div", [e.op("Mul", [diff, e.const(2.0)]), count])
    return LossParts(loss, seed, [info], descriptions)


def distill(e: Emitter, out: LossInput) -> LossParts:
    """alpha * kl + (1 - alpha) * cross_entropy: distillation mixed with labels; ``alpha`` is a float
    scalar input, so one graph serves every mix."""
    soft, hard = kl(e, out), cross_entropy(e, out)
    alpha = out.fresh_input("alpha")
    beta = e.op("Sub", [e.const(1.0), alpha])

    def mix(a: str, b: str) -> str:
        return e.op("Add", [e.op("Mul", [a, alpha]), e.op("Mul", [b, beta])])

    info = helper.make_tensor_value_info(alpha, e.elem_type, [])
    descriptions = {**soft.descriptions, **hard.descriptions, alpha: f"{e.dtype.name} []: weight of the kl term"}
    return LossParts(mix(soft.loss, hard.loss), mix(soft.seed, hard.seed), soft.inputs + hard.inputs + [info],
                     descriptions)


def total(e: Emitter, out: LossInput) -> LossParts:
    """The sum of every element of the output (handy for tests and for plain output sensitivities)."""
    return LossParts(e.reduce_sum(out.name, None, keepdims=False), e.ones_like(out.name))


LOSSES: dict[str, Callable[[Emitter, LossInput], LossParts]] = {
    "cross_entropy": cross_entropy,
    "kl": kl,
    "mse": mse,
    "distill": distill,
    "sum": total,
}
