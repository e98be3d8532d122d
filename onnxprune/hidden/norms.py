"""Normalisations over the last axis, however they are spelled, recognised by what they compute.

An exporter writes a LayerNorm as one ``LayerNormalization`` op, or as primitives (torch's RMSNorm:
``Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul``; tf2onnx and JAX: ``ReduceMean, Sub, Mul, Sqrt,
Reciprocal``, sometimes with the scale folded into a ``x * s + (b - mean * s)`` form). Rather than one
matcher per spelling, :func:`find_norms` takes every *region* that starts at a tensor ``x`` read by a
mean (or a norm op), grows through elementwise ops whose other inputs are per-channel constants, and
ends in one tensor ``y``; it then runs the region alone in onnxruntime and fits

    layer: y = scale * (x - mean(x)) / sqrt(var(x) + eps) + bias
    rms:   y = scale * x / sqrt(mean(x^2) + eps) + bias

accepting the region only when the fit reproduces it on fresh inputs at several scales (relative
error below 1e-4). What no fit explains is not a norm, and the model is left as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from .. import ir, runtime

NORM_OPS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"} | NORM_OPS
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Identity", "Cast", "Max",
               "Clip"}
REGION_OPS = REDUCE_OPS | ELEMENTWISE
FIT_RTOL = 1e-4


@dataclass
class Norm:
    """``y = scale * normalize(x) + bias`` over the last axis (``kind`` "layer" centres, "rms" does not)."""

    x: str
    y: str
    kind: str
    scale: np.ndarray          # float64 [d]
    bias: np.ndarray           # float64 [d] (zeros when the norm has none)
    eps: float
    nodes: list[str] = field(default_factory=list)   # names of the nodes that compute it

    @property
    def width(self) -> int:
        return len(self.scale)


def find_norms(proto: onnx.ModelProto, shapes: dict[str, list] | None = None) -> list[Norm]:
    """Every region of ``proto``'s main graph that computes a normalisation over the last axis."""
    g = proto.graph
    shapes = shapes if shapes is not None else {k: v for k, (v, _) in ir.infer(proto).items()}
    consts = constants(g)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    roots = []
    for n in g.node:
        if n.op_type in REDUCE_OPS and n.input and n.input[0] not in consts:
            x = n.input[0]
            pn = producer.get(x)
            # RMS: the mean reads x*x or x**2; the root is x itself
            if pn is not None and pn.op_type in ("Pow", "Mul") and pn.input[0] not in consts and (
                    pn.op_type == "Pow" or pn.input[1] == pn.input[0]):
                x = pn.input[0]
            while (p := producer.get(x)) is not None and p.op_type in ("Cast", "Identity") and \
                    len(p.input) == 1 and x not in consts:   # torch casts to float32 first (a no-op here)
                x = p.input[0]
            if x not in roots:
                roots.append(x)
    outputs = {o.name for o in g.output}
    found, claimed = [], set()
    regions = {x: _region(x, consumers, consts, shapes) for x in roots}
    inside = {t for nodes in regions.values() for n in nodes for t in n.output}
    for x in roots:
        nodes = regions[x]
        if x in inside or x in claimed or not nodes or not any(n.op_type in REDUCE_OPS for n in nodes):
            continue
        names = {id(n) for n in nodes}
        made = {t for n in nodes for t in n.output}
        exits = [t for t in made if t in outputs or any(id(c) not in names for c in consumers.get(t, []))]
        shape = shapes.get(x)
        if len(exits) != 1 or not shape or not isinstance(shape[-1], int) or shape[-1] < 2:
            continue
        norm = _fit(proto, x, exits[0], nodes, consts, len(shape), shape[-1])
        if norm is not None:
            found.append(norm)
            claimed.add(x)
    return found


def constants(g: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node values of ``g`` by tensor name."""
    out = {t.name: t for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and len(n.output) == 1:
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out[n.output[0]] = a.t
    return out


def _per_channel(t: onnx.TensorProto, rank: int) -> bool:
    """A constant that broadcasts along the last axis only (a scalar, or ``[1, ..., 1, d]``)."""
    dims = list(t.dims)
    return len(dims) <= rank and all(d == 1 for d in dims[:-1])


def _region(x: str, consumers, consts, shapes) -> list[onnx.NodeProto]:
    """Nodes reachable from ``x`` through region ops whose other inputs are per-channel constants."""
    rank = len(shapes.get(x) or [])
    have, nodes, seen = {x}, [], set()
    frontier = [x]
    while frontier:
        t = frontier.pop()
        for c in consumers.get(t, []):
            if id(c) in seen or c.op_type not in REGION_OPS:
                continue
            others = [i for i in c.input if i and i not in have]
            if c.op_type in REDUCE_OPS - NORM_OPS:
                others = [i for i in others if i not in consts]  # axes given as an input
            if any(i not in consts or not _per_channel(consts[i], rank) for i in others):
                continue
            if c.op_type in NORM_OPS and c.input[0] not in have:
                continue
            seen.add(id(c))
            nodes.append(c)
            for o in c.output:
                if o:
                    have.add(o)
                    frontier.append(o)
    return nodes


def _fit(proto, x, y, nodes, consts, rank, d) -> Norm | None:
    """Run the region alone and fit a LayerNorm or an RMSNorm to it; None when neither explains it."""
    order = {id(n): i for i, n in enumerate(proto.graph.node)}
    nodes = sorted(nodes, key=lambda n: order[id(n)])
    # keep only the nodes y depends on
    need, keep = {y}, []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(n.input)
    keep.reverse()
    made = {o for n in keep for o in n.output}
    inits = []
    for i in need:
        if i in consts and i not in made:   # a Constant node's value: an initializer named after its output
            t = onnx.TensorProto()
            t.CopyFrom(consts[i])
            t.name = i
            inits.append(t)
    elem = onnx.TensorProto.FLOAT
    graph = helper.make_graph(keep, "norm", [helper.make_tensor_value_info(x, elem, [None] * rank)],
                              [helper.make_tensor_value_info(y, elem, None)], inits)
    m = helper.make_model(graph, opset_imports=list(proto.opset_import))
    m.ir_version = proto.ir_version
    try:
        sess = runtime.session(m, optimize=False)
    except Exception:
        return None
    if rank < 2:
        return None

    def f(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float64).reshape(-1, d)
        out = sess.run(None, {x: v.astype(np.float32).reshape([1] * (rank - 2) + [len(v), d])})[0]
        return np.asarray(out, np.float64).reshape(len(v), d)

    rng = np.random.default_rng(0)
    try:
        ones = np.ones((1, d))
        centred = np.allclose(f(ones), f(-ones), rtol=1e-5, atol=1e-6)
        kind = "layer" if centred else "rms"
        bias = f(ones)[0] if centred else f(np.zeros((1, d)))[0]
        big = rng.standard_normal((64, d)) * 10
        n = _normalize(big, kind, 0.0)
        scale = ((f(big) - bias) * n).sum(0) / np.maximum((n * n).sum(0), 1e-30)
        eps = _fit_eps(f, kind, scale, bias, d, rng)
        # at the scale of eps itself float32 kernels lose digits (var = E[x^2] - E[x]^2): a looser check there
        for s, rtol in ((1.0, FIT_RTOL), (0.05, FIT_RTOL), (30.0, FIT_RTOL), (np.sqrt(eps) if eps > 0 else 1e-3, 1e-2)):
            v = rng.standard_normal((8, d)) * s + (rng.standard_normal((8, 1)) * s if kind == "layer" else 0)
            want = scale * _normalize(v, kind, eps) + bias
            got = f(v)
            if not np.all(np.isfinite(got)) or np.abs(got - want).max() > rtol * max(np.abs(want).max(), 1e-6):
                return None
    except Exception:
        return None
    return Norm(x, y, kind, scale, bias, eps, [n.name for n in keep])


def _normalize(v: np.ndarray, kind: str, eps: float) -> np.ndarray:
    if kind == "layer":
        v = v - v.mean(-1, keepdims=True)
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + eps)


def _fit_eps(f, kind, scale, bias, d, rng) -> float:
    """eps from inputs whose mean square is comparable to it: ``|n|^2 / d = v / (v + eps)``."""
    safe = np.abs(scale) > 1e-6 * np.abs(scale).max()
    for v in 10.0 ** -np.arange(2, 16, dtype=np.float64):
        x = rng.standard_normal((16, d))
        x = x - x.mean(-1, keepdims=True) if kind == "layer" else x
        x *= np.sqrt(v / (x * x).mean(-1, keepdims=True))
        n = (f(x) - bias)[:, safe] / scale[safe]
        m = (n * n).mean(-1) if safe.sum() else np.ones(1)
        m = float(np.median(m))
        if m < 0.9:
            return max(float(v * (1.0 / m - 1.0)), 0.0)
    return 0.0
