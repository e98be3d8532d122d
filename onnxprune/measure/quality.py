"""How good a model is on data: accuracy against labels, fidelity against a reference, size.

    accuracy(model, data)              -> {"top1": 0.91, "top5": 0.99, "n": 10000}
    fidelity(candidate, reference, data)
        -> {output: {"top1_agreement", "cosine", "max_abs", "mean_abs", "rel_error"}}
    evaluate(candidate, data, reference=ref)  -> EvalReport (accuracy + fidelity + params/MACs/size)

Every function streams the data batch by batch through onnxruntime sessions
created once, running candidate and reference on the same batch, so memory
stays bounded by one batch of outputs. Models whose batch dimension is fixed
are fed batches of exactly that size (the last one padded and trimmed).

Conventions: logits are ``[N, C]`` or ``[N, C, 1, 1]``; top-5 is reported only
when there are more than 5 classes; a label counts as a top-k hit when fewer
than k other classes score at least as high (ties and NaN never count as hits).
Outputs of candidate and reference are matched by name, then the remaining
ones by position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
import onnx

from .. import ir, runtime
from ..data import ArrayData
from ..errors import OnnxPruneError

ModelLike = Union[onnx.ModelProto, ir.Model]
FIDELITY_KEYS = ("top1_agreement", "cosine", "max_abs", "mean_abs", "rel_error")


def proto_of(model: ModelLike) -> onnx.ModelProto:
    return model.proto if isinstance(model, ir.Model) else model


def check_same_inputs(candidate: ModelLike, reference: ModelLike) -> None:
    """Raise unless both models take the same inputs (names, element types, ranks, fixed dims)."""
    cand = {vi.name: vi for vi in ir.graph_inputs(proto_of(candidate))}
    ref = {vi.name: vi for vi in ir.graph_inputs(proto_of(reference))}
    if set(cand) != set(ref):
        raise OnnxPruneError(f"the reference takes inputs {sorted(ref)}, the model takes {sorted(cand)}; "
                             "compare a model with the original it was pruned from")
    from ..analysis import KV_INPUT   # a KV cache pruned with its heads (--kv-cache) declares fewer of them

    for name, vi in cand.items():
        a, b = ir.input_dims(vi), ir.input_dims(ref[name])
        fixed_differ = not KV_INPUT.match(name) and any(isinstance(x, int) and isinstance(y, int) and x > 0 and
                                                        y > 0 and x != y for x, y in zip(a, b))
        if ir.input_dtype(vi) != ir.input_dtype(ref[name]) or (a and b and len(a) != len(b)) or fixed_differ:
            raise OnnxPruneError(f"input '{name}' is {ir.input_dtype(vi)}{a} in the model but "
                                 f"{ir.input_dtype(ref[name])}{b} in the reference; the two models must "
                                 "take the same inputs")


def class_scores(y: np.ndarray) -> np.ndarray | None:
    """``y`` as ``[N, C]`` scores when it is classification-shaped (C > 1), else None."""
    if y.ndim < 2 or y.shape[1] < 2 or any(d != 1 for d in y.shape[2:]):
        return None
    return y.reshape(y.shape[0], y.shape[1])


class _Runner:
    """One runner (the model as deployed) and the batch size its inputs accept."""

    def __init__(self, model: ModelLike):
        self.sess = runtime.session(proto_of(model), role="deployed")
        self.inputs = [i.name for i in self.sess.inputs]
        self.outputs = [o.name for o in self.sess.outputs]
        fixed = {i.shape[0] for i in self.sess.inputs if i.shape and isinstance(i.shape[0], int)}
        self.fixed_batch = fixed.pop() if len(fixed) == 1 and min(fixed) > 0 else None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return runtime.run(self.sess, {k: feed[k] for k in self.inputs})
        except Exception as e:
            raise run_error(e) from None


def run_error(e: Exception) -> OnnxPruneError:
    """A failed ``session.run`` on the user's inputs, as a one-line user error."""
    first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
    return OnnxPruneError(f"onnxruntime cannot run the model on these inputs: {first}")


def _stream(runners: list[_Runner], data: ArrayData, batch_size: int, limit: int | None = None
            ) -> Iterator[tuple[np.ndarray | None, list[dict[str, np.ndarray]]]]:
    """Yield ``(labels, [outputs of each runner])`` per batch, all runners on the same samples."""
    if batch_size < 1:
        raise OnnxPruneError(f"batch size {batch_size}: must be at least 1")
    missing = [n for r in runners for n in r.inputs if n not in data.arrays]
    if missing:
        raise OnnxPruneError(f"the data has no array for model input '{missing[0]}' "
                             f"(arrays: {sorted(data.arrays)})")
    fixed = {r.fixed_batch for r in runners} - {None}
    if len(fixed) > 1:
        raise OnnxPruneError(f"the models have different fixed batch sizes {sorted(fixed)}")
    size = next(iter(fixed), batch_size)
    for feed, labels in zip(data.batches(size, limit), data.label_batches(size, limit)):
        n = len(next(iter(feed.values())))
        if n == size or not fixed:
            yield labels, [r.run(feed) for r in runners]
            continue
        # a fixed-batch model gets a full batch (the last sample repeated) and its outputs are trimmed
        feed = {k: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)]) for k, v in feed.items()}
        yield labels, [{k: v[:n] for k, v in r.run(feed).items()} for r in runners]


def _pair_outputs(cand: list[str], ref: list[str]) -> list[tuple[str, str]]:
    """(candidate output, reference output) pairs: same names first, then the rest by position."""
    if len(cand) != len(ref):
        raise OnnxPruneError(f"the model has {len(cand)} outputs, the reference {len(ref)}; "
                             "fidelity needs the same outputs")
    leftover = iter([r for r in ref if r not in cand])
    return [(c, c if c in ref else next(leftover)) for c in cand]


class TopK:
    """Running top-1 / top-5 accuracy over batches of scores and labels."""

    def __init__(self, output: str):
        self.output = output
        self.n = self.top1 = self.top5 = 0
        self.classes = 0

    def update(self, y: np.ndarray, labels: np.ndarray) -> None:
        scores = class_scores(y)
        if scores is None:
            raise OnnxPruneError(f"output '{self.output}' has shape {list(y.shape)}; accuracy needs class "
                                 "scores [N, C] (drop 'labels' from the data, or name the logits output)")
        self.classes = scores.shape[1]
        if labels.size and (labels.min() < 0 or labels.max() >= self.classes):
            bad = labels[(labels < 0) | (labels >= self.classes)]
            raise OnnxPruneError(f"label {bad[0]} is out of range: output '{self.output}' has {self.classes} "
                                 f"classes, so labels must be in [0, {self.classes - 1}]")
        s = np.nan_to_num(scores.astype(np.float64), nan=-np.inf)
        mine = s[np.arange(len(labels)), labels]
        rank = (s >= mine[:, None]).sum(axis=1) - 1  # other classes scoring at least as high
        self.n += len(labels)
        self.top1 += int((rank < 1).sum())
        self.top5 += int((rank < 5).sum())

    def result(self) -> dict:
        if not self.n:
            return {"top1": None, "top5": None, "n": 0}
        return {"top1": self.top1 / self.n, "top5": self.top5 / self.n if self.classes > 5 else None,
                "n": self.n}


class Agreement:
    """Running comparison of one candidate output with its reference output."""

    def __init__(self, name: str):
        self.name = name
        self.n = self.agree = self.elems = 0
        self.classification = True
        self.cos_sum = self.abs_sum = self.diff_sq = self.ref_sq = 0.0
        self.max_abs = 0.0

    def update(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            raise OnnxPruneError(f"output '{self.name}' has shape {list(a.shape)} in the model but "
                                 f"{list(b.shape)} in the reference")
        a64 = a.reshape(len(a), -1).astype(np.float64)
        b64 = b.reshape(len(b), -1).astype(np.float64)
        sa, sb = class_scores(a), class_scores(b)
        self.classification = self.classification and sa is not None
        if self.classification:
            self.agree += int((sa.argmax(axis=1) == sb.argmax(axis=1)).sum())
        diff = a64 - b64
        na, nb = np.linalg.norm(a64, axis=1), np.linalg.norm(b64, axis=1)
        dot = (a64 * b64).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            cos = dot / (na * nb)
        cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) != (nb == 0), 0.0, cos))
        self.n += len(a)
        self.elems += diff.size
        self.cos_sum += float(cos.sum())
        self.abs_sum += float(np.abs(diff).sum())
        self.diff_sq += float((diff ** 2).sum())
        self.ref_sq += float((b64 ** 2).sum())
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    def result(self) -> dict:
        if self.ref_sq > 0:
            rel = math.sqrt(self.diff_sq) / math.sqrt(self.ref_sq)
        else:
            rel = 0.0 if self.diff_sq == 0 else math.inf
        return {
            "top1_agreement": self.agree / self.n if self.classification and self.n else None,
            "cosine": self.cos_sum / self.n if self.n else None,
            "max_abs": self.max_abs,
            "mean_abs": self.abs_sum / self.elems if self.elems else 0.0,
            "rel_error": rel,
        }


@dataclass
class Measured:
    """What one pass of a candidate (and a reference) over data measured."""

    accuracy: dict | None
    reference_accuracy: dict | None
    fidelity: dict[str, dict] | None


def compare(candidate: ModelLike, data: ArrayData, reference: ModelLike | None, *, batch_size: int,
            output: str | None, want_accuracy: bool, limit: int | None = None, progress=None) -> Measured:
    """One pass over ``data``: accuracy of both models (when wanted) and fidelity (with a reference)."""
    runners = [_Runner(candidate)]
    if reference is not None:
        check_same_inputs(candidate, reference)
        runners.append(_Runner(reference))
    out = output or runners[0].outputs[0]
    if out not in runners[0].outputs:
        raise OnnxPruneError(f"the model has no output '{out}' (outputs: {', '.join(runners[0].outputs)})")
    pairs = _pair_outputs(runners[0].outputs, runners[1].outputs) if reference is not None else []
    ref_out = dict(pairs).get(out)
    if want_accuracy and data.labels is None:
        raise OnnxPruneError("the data has no 'labels' array; accuracy needs one int label per sample")
    acc = [TopK(out), TopK(ref_out or out)] if want_accuracy else []
    agree = {c: Agreement(c) for c, _ in pairs}
    stream = _stream(runners, data, batch_size, limit)
    if progress is not None:
        n = data.num_samples if limit is None else min(limit, data.num_samples)
        stream = progress(stream, total=-(-n // batch_size), description="evaluating (batches)")
    for labels, outs in stream:
        if acc:
            acc[0].update(outs[0][out], labels)
            if reference is not None:
                acc[1].update(outs[1][ref_out], labels)
        for c, r in pairs:
            agree[c].update(outs[0][c], outs[1][r])
    return Measured(
        accuracy=acc[0].result() if acc else None,
        reference_accuracy=acc[1].result() if acc and reference is not None else None,
        fidelity={c: a.result() for c, a in agree.items()} if reference is not None else None,
    )


def accuracy(model: ModelLike, data: ArrayData, batch_size: int = 64, output: str | None = None, *,
             limit: int | None = None) -> dict:
    """``{"top1", "top5", "n"}`` of ``model``'s output (the first unless named) against ``data.labels``,
    over the first ``limit`` samples (all by default)."""
    return compare(model, data, None, batch_size=batch_size, output=output, want_accuracy=True,
                    limit=limit).accuracy


def fidelity(candidate: ModelLike, reference: ModelLike, data: ArrayData, batch_size: int = 64, *,
             limit: int | None = None) -> dict[str, dict]:
    """Per candidate output: top-1 agreement (classification-shaped outputs, else None), mean cosine
    similarity per sample, max and mean absolute error, and relative error ‖a-b‖/‖b‖."""
    return compare(candidate, data, reference, batch_size=batch_size, output=None,
                    want_accuracy=False, limit=limit).fidelity


def points(candidate: ModelLike, reference: ModelLike, data: ArrayData, limit: int | None = 512) -> tuple[float, str]:
    """Accuracy in points with labels, else top-1 agreement (or cosine) with the reference, in points."""
    if data.labels is not None:
        return 100.0 * accuracy(candidate, data, limit=limit)["top1"], "top-1 accuracy"
    fid = next(iter(fidelity(candidate, reference, data, limit=limit).values()))
    if fid.get("top1_agreement") is not None:
        return 100.0 * fid["top1_agreement"], "top-1 agreement with the original"
    return 100.0 * fid["cosine"], "cosine similarity with the original (x100)"


@dataclass
class EvalReport:
    """Everything ``onnxprune eval`` reports; ``to_json()`` has the stable keys of the CLI's ``--json``."""

    model: str
    samples: int
    params: int
    macs: int
    file_bytes: int | None
    accuracy: dict | None = None
    fidelity: dict[str, dict] | None = None
    reference: str | None = None
    reference_accuracy: dict | None = None
    reference_params: int | None = None
    reference_macs: int | None = None
    reference_file_bytes: int | None = None
    data: str = ""
    perplexity: dict | None = None            # measure.perplexity.perplexity() of the model, or None
    reference_perplexity: dict | None = None

    def to_json(self) -> dict:
        def acc(a: dict | None) -> dict | None:
            return None if a is None else {"top1": _finite(a["top1"]), "top5": _finite(a["top5"])}

        fid = None if self.fidelity is None else {
            name: {k: _finite(v[k]) for k in FIDELITY_KEYS} for name, v in self.fidelity.items()}
        return {
            "model": self.model, "reference": self.reference, "samples": self.samples,
            "accuracy": acc(self.accuracy), "reference_accuracy": acc(self.reference_accuracy),
            "fidelity": fid,
            "params": self.params, "macs": self.macs, "file_bytes": self.file_bytes,
            "reference_params": self.reference_params, "reference_macs": self.reference_macs,
            "reference_file_bytes": self.reference_file_bytes,
            "perplexity": _ppl(self.perplexity), "reference_perplexity": _ppl(self.reference_perplexity),
        }


def _ppl(p: dict | None) -> dict | None:
    return None if p is None else {"perplexity": _finite(p["perplexity"]), "nll": _finite(p["nll"]),
                                   "tokens": p["tokens"]}


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def model_name(model: ModelLike, default: str) -> str:
    return str(model.path) if isinstance(model, ir.Model) and model.path else default


def size_stats(model: ModelLike, input_shapes: dict[str, list[int]] | None = None
               ) -> tuple[int, int, int | None]:
    """``(params, macs, file_bytes)``; an in-memory model counts its serialised size."""
    from .counts import summarize

    proto = proto_of(model)
    stats = summarize(proto, ir.resolve_input_shapes(proto, input_shapes))
    if isinstance(model, ir.Model) and model.path:
        size = model.file_bytes
    else:
        size = stats.file_bytes if stats.file_bytes is not None else proto.ByteSize()
    return int(stats.params), int(stats.macs), size


def evaluate(candidate: ModelLike, data: ArrayData, reference: ModelLike | None = None,
             input_shapes: dict[str, list[int]] | None = None, *, batch_size: int = 64,
             output: str | None = None, limit: int | None = None, progress=None) -> EvalReport:
    """Accuracy (when ``data`` has labels), fidelity (when a reference is given) and size, in one pass.

    ``input_shapes`` fixes symbolic dimensions for counting MACs (they default to 1); ``limit``
    evaluates the first samples only.
    """
    m = compare(candidate, data, reference, batch_size=batch_size, output=output,
                want_accuracy=data.labels is not None, limit=limit, progress=progress)
    params, macs, size = size_stats(candidate, input_shapes)
    samples = data.num_samples if limit is None else min(limit, data.num_samples)
    report = EvalReport(model=model_name(candidate, "model"), samples=samples, params=params,
                        macs=macs, file_bytes=size, accuracy=m.accuracy, fidelity=m.fidelity,
                        data=data.source or data.kind)
    if reference is not None:
        report.reference = model_name(reference, "reference")
        report.reference_accuracy = m.reference_accuracy
        report.reference_params, report.reference_macs, report.reference_file_bytes = \
            size_stats(reference, input_shapes)
    return report
