"""Gradient criteria: first-order Taylor estimates of how much the loss changes when a channel goes.

* ``taylor`` (Molchanov et al. 2017): on each activation of the group,
  ``Σ_samples |Σ_positions a · ∂L/∂a|`` per channel — removing the channel sets
  ``a`` to zero, which changes that sample's loss by about ``-Σ a·∂L/∂a``.
* ``taylor-weight`` (the per-weight form, as in Torch-Pruning's ``TaylorImportance``):
  on each coupled weight, ``Σ_batches Σ_{weights of the channel} |w · ∂L/∂w|``.

The loss is cross-entropy to the data's labels when it has them and the model's
first output is ``[N, C]`` logits; without labels, cross-entropy to the model's own
top-1 class (the original model's outputs as the target). Any other output gets
the mean squared error to the original output plus unit Gaussian noise: its
gradient is a random projection of the output, so ``|a·g|`` estimates the size of
the output change when the channel is removed.

Gradients come from one graph built by :mod:`onnxprune.train.autodiff` for every tensor
all groups asked for, run in onnxruntime in one pass over the data (two sessions
when the target comes from the model's own outputs). Tensors whose gradient cannot
be built (an op without a rule between them and the output) are not measured and
the group falls back to ``act-mean`` / ``l2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import ir, runtime
from ..train.autodiff import build_gradient_model, differentiable
from ..groups import ACTIVATION, Group
from .base import Criterion
from .context import ScoreContext
from .layers import to_channels
from .stats import Needs, fit_fixed_batch
from .weights import weight_members

NOISE_SEED = 0


@dataclass
class _Gradients:
    """What the groups asked for, what the data pass measured, and which tensors can be measured."""

    usable: set[str] | None = None
    acts: set[tuple[str, int]] = field(default_factory=set)
    weights: set[str] = field(default_factory=set)
    act_scores: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)   # per position of the axis
    weight_scores: dict[str, np.ndarray] = field(default_factory=dict)            # weight-shaped Σ|w·g|
    samples: int = 0

    def missing(self) -> tuple[list[tuple[str, int]], list[str]]:
        return (sorted(self.acts - set(self.act_scores)), sorted(self.weights - set(self.weight_scores)))


def _state(ctx: ScoreContext) -> _Gradients:
    st = ctx.cache.setdefault("gradients", _Gradients())
    if st.usable is None:
        st.usable = differentiable(ctx.proto)
    return st


# ------------------------------------------------------------------ planning (structural)
def _act_members(group: Group, ctx: ScoreContext):
    usable = _state(ctx).usable
    return [m for m in group.of_kind(ACTIVATION) if m.tensor in usable]


def _weight_members(group: Group, ctx: ScoreContext):
    usable = _state(ctx).usable
    return [m for m in weight_members(group, ctx) if m.tensor in usable]


def _plan_taylor(group: Group, ctx: ScoreContext) -> Needs | None:
    members = _act_members(group, ctx)
    if not members:
        return None
    _state(ctx).acts.update((m.tensor, m.axis) for m in members)
    return Needs()


def _plan_taylor_weight(group: Group, ctx: ScoreContext) -> Needs | None:
    members = _weight_members(group, ctx)
    if not members:
        return None
    _state(ctx).weights.update(m.tensor for m in members)
    return Needs()


# ------------------------------------------------------------------ scoring
def _taylor(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    st = _measured(ctx)
    return [to_channels(st.act_scores[(m.tensor, m.axis)], m.index, group.size) for m in _act_members(group, ctx)]


def _taylor_weight(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    st = _measured(ctx)
    out = []
    for m in _weight_members(group, ctx):
        s = st.weight_scores[m.tensor]
        out.append(to_channels(np.moveaxis(s, m.axis, 0).reshape(s.shape[m.axis], -1).sum(axis=1),
                               m.index, group.size))
    return out


def _measured(ctx: ScoreContext) -> _Gradients:
    """The state with everything planned so far measured (one pass over the data for what is missing)."""
    st = _state(ctx)
    acts, weights = st.missing()
    if acts or weights:
        measure(ctx, st, acts, weights)
    return st


def measure(ctx: ScoreContext, st: _Gradients, acts: list[tuple[str, int]], weights: list[str]) -> None:
    """Stream ``ctx.data`` once through a gradient graph for ``acts`` and ``weights``; add their scores."""
    proto, data = ctx.proto, ctx.data
    output = proto.graph.output[0].name
    target = Target.of(proto, data, ctx.analysis.shapes.get(output) or _output_shape(proto, output))
    tensors = list(dict.fromkeys([t for t, _ in acts] + weights))
    gm = build_gradient_model(proto, tensors, loss=target.loss)
    model, products = _with_products(gm, acts, ctx.analysis.shapes, proto)
    fetch = list(products.values()) + [gm.grad_names[w] for w in weights]
    sess = runtime.session(model)
    batch_size, limit = fit_fixed_batch(proto, data, ctx.batch_size, ctx.limit)
    n_batches = -(-(data.num_samples if limit is None else min(limit, data.num_samples)) // batch_size)
    it = zip(data.batches(batch_size, limit), target.labels(data, batch_size, limit))
    if ctx.progress:
        it = ctx.progress(it, n_batches, "gradients (taylor)")
    values = {w: np.asarray(ctx.value(w), np.float64) for w in weights}
    for feed, labels in it:
        got = {**feed, **dict(zip(fetch, sess.run(fetch, {**feed, **target.feed(feed, labels, gm.extra_inputs)})))}
        n = len(next(iter(feed.values())))
        for key, name in products.items():     # the loss is a batch mean: n·g is each sample's own gradient
            per_sample = np.abs(np.asarray(got[name], np.float64) * n)
            st.act_scores[key] = st.act_scores.get(key, 0.0) + (per_sample.sum(axis=0) if key[1] else per_sample)
        for w in weights:
            st.weight_scores[w] = st.weight_scores.get(w, 0.0) + np.abs(values[w] * got[gm.grad_names[w]])
        st.samples += n


def _with_products(gm, acts: list[tuple[str, int]], shapes: dict, forward: onnx.ModelProto
                   ) -> tuple[onnx.ModelProto, dict]:
    """The gradient model plus one output per ``(activation, axis)``: ``Σ a·∂L/∂a`` over every axis but
    the batch and ``axis`` ([N, size] or, for axis 0, [N]), so only those small sums leave the session
    (:func:`per_position` of the full tensors is their sum of absolute values over samples)."""
    model = onnx.ModelProto()
    model.CopyFrom(gm.proto)
    g = model.graph
    drop = {gm.grad_names[t] for t, _ in acts}        # activation gradients stay inside the session
    keep = [o for o in g.output if o.name not in drop]
    del g.output[:]
    g.output.extend(keep)
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | {i.name for i in g.initializer}
    shapes = {**ir.infer_shapes(gm.proto), **shapes} if any(t not in shapes for t, _ in acts) else shapes
    readers: dict[str, int] = {}
    for n in forward.graph.node:
        for t in set(n.input):
            readers[t] = readers.get(t, 0) + 1
    outputs = {o.name for o in forward.graph.output}
    relu_of = {n.input[0]: n.output[0] for n in forward.graph.node if n.op_type == "Relu"
               and n.domain in ("", "ai.onnx") and readers[n.input[0]] == 1 and n.input[0] not in outputs}
    same = {key: _through_relus(relu_of, key, set(acts)) for key in acts}
    names = {}
    for t, axis in sorted(acts, key=lambda key: same[key] != key):
        if same[(t, axis)] != (t, axis):               # x·∂L/∂x = Relu(x)·∂L/∂Relu(x), element by element
            names[(t, axis)] = names[same[(t, axis)]]
            continue
        name, k = f"{t}_taylor{axis}", 0
        while name in taken:
            k += 1
            name = f"{t}_taylor{axis}_{k}"
        taken.add(name)
        axes = [i for i in range(1, len(shapes[t])) if i != axis]
        if axes:
            g.node.append(helper.make_node("Mul", [t, gm.grad_names[t]], [f"{name}/product"]))
            g.initializer.append(numpy_helper.from_array(np.asarray(axes, np.int64), f"{name}/axes"))
            g.node.append(helper.make_node("ReduceSum", [f"{name}/product", f"{name}/axes"], [name], keepdims=0))
        else:
            g.node.append(helper.make_node("Mul", [t, gm.grad_names[t]], [name]))
        names[(t, axis)] = name
    return runtime.with_outputs(model, list(dict.fromkeys(names.values())), {}), names


def _through_relus(relu_of: dict[str, str], key: tuple[str, int], asked: set) -> tuple[str, int]:
    """The last requested ``(tensor, axis)`` reached from ``key`` through Relus (``key`` itself if none)."""
    t, axis = key
    while relu_of.get(t) is not None and (relu_of[t], axis) in asked:
        t = relu_of[t]
    return t, axis


def per_position(a: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    """``Σ_samples |Σ_other positions a·g|`` for each position of ``axis`` (axis 0 is the batch)."""
    p = np.asarray(a, np.float64) * np.asarray(g, np.float64)
    if axis == 0 or p.ndim == 1:
        return np.abs(np.moveaxis(p, axis, 0).reshape(p.shape[axis], -1).sum(axis=1))
    other = tuple(i for i in range(1, p.ndim) if i != axis)
    return np.abs(p.sum(axis=other) if other else p).sum(axis=0)


# ------------------------------------------------------------------ the loss target
@dataclass
class Target:
    """Which loss the gradients are taken of, and how its extra inputs are fed per batch."""

    loss: str                       # "cross_entropy" or "mse"
    use_labels: bool
    reference: object = None        # onnxruntime session of the model (targets from its own outputs)
    output: str = ""
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(NOISE_SEED))

    @classmethod
    def of(cls, proto: onnx.ModelProto, data, shape: list) -> "Target":
        """The target for ``proto``'s first output, whose shape is ``shape``."""
        logits = len(shape) == 2 and isinstance(shape[1], int) and shape[1] > 1
        use_labels = logits and getattr(data, "labels", None) is not None
        reference = None if use_labels else runtime.session(proto)
        return cls("cross_entropy" if logits else "mse", use_labels, reference, proto.graph.output[0].name)

    def labels(self, data, batch_size: int, limit: int | None):
        """One labels array (or None) per batch of ``data.batches(batch_size, limit)``."""
        if self.use_labels:
            yield from data.label_batches(batch_size, limit)
        else:
            while True:
                yield None

    def feed(self, feed: dict[str, np.ndarray], labels: np.ndarray | None, extra: dict[str, str]) -> dict:
        """The loss inputs for one batch: labels, the model's own top-1, or its output plus noise."""
        name = next(iter(extra))
        if self.use_labels:
            return {name: np.asarray(labels, np.int64)}
        inputs = {i.name for i in self.reference.inputs}
        y = self.reference.run([self.output], {k: v for k, v in feed.items() if k in inputs})[0]
        if self.loss == "cross_entropy":
            return {name: y.argmax(axis=1).astype(np.int64)}
        return {name: (y + self.rng.standard_normal(y.shape)).astype(y.dtype)}


def _output_shape(proto: onnx.ModelProto, output: str) -> list:
    for vi in proto.graph.output:
        if vi.name == output and vi.type.tensor_type.HasField("shape"):
            return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return []


CRITERIA = [
    Criterion("taylor", _plan_taylor, _taylor, requires_data=True, fallback="act-mean",
              summary="Σ|activation·gradient| per channel (first-order Taylor)"),
    Criterion("taylor-weight", _plan_taylor_weight, _taylor_weight, requires_data=True, fallback="l2",
              summary="Σ|w·∂L/∂w| over coupled weights (first-order Taylor)"),
]
