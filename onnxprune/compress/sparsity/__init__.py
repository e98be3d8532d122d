"""Unstructured and N:M sparsity: zero individual weights of Conv/ConvTranspose/Gemm/MatMul.

Every weight is seen through a :class:`Layout`, a ``[groups, rows, cols]`` matrix view in
which a row is one output and the columns are the inputs it sums over, so one set of
criteria serves every op:

* ``magnitude`` -- smallest ``|W|`` per layer (or across layers with ``global_scope``);
* ``wanda`` -- smallest ``|W| * ||X_col||`` per output row (Sun et al. 2023), column norms
  from calibration data;
* ``sparsegpt`` -- OBS mask selection and blocked column-by-column compensation of the kept
  weights with ``H = X^T X + damp * mean(diag H) * I`` (Frantar & Alistarh 2023).

Column order.  Conv ``W[O, I/g, *k]`` is viewed as ``[g, O/g, k..., I/g]`` -- input channels
innermost, as NVIDIA's 2:4 sparsity is defined for convolutions -- so an N:M block is M
consecutive input channels at one kernel position of one output channel; layers whose
``I/g`` is not a multiple of M are skipped for N:M.  ConvTranspose ``W[I, O/g, *k]`` rows are
(output channel, kernel position), columns its group's input channels (its calibration
statistics treat each kernel tap as a 1x1 conv: exact when stride >= kernel).  Gemm rows are
the outputs and columns K (``transB`` respected); MatMul ``W[K, N]`` the same, along K.
``N:M`` keeps N of every M (2:4 = 50%).

Counts.  Per-layer criteria zero exactly ``floor(s*n + 1/2)`` weights of an ``n``-weight
layer (row and column-block quotas are rounded cumulatively so they add up to it); global
magnitude zeros exactly ``floor(s*N + 1/2)`` of all ``N`` eligible weights; N:M zeros M-N
in every block.

Scope.  Only float initializers at the weight input (index 1) of those ops, never biases or
norms; tensors under ``min_size`` elements (128) and ``ignore``-d node or tensor names are
skipped; the final classifier is included by default.  A tensor read by several layers gets
one mask, chosen by magnitude (calibration criteria fall back, and the layer's ``note`` says
so).  With ``sequential`` (default) calibration runs in waves: a layer's statistics come
from the model with every weight layer upstream of it already sparsified.

JSON report of ``onnxprune sparsify --json`` (stable keys): ``sparsity`` (target),
``pattern`` ("N:M" or null), ``criterion``, ``global``, ``achieved_sparsity`` (zeros / weights
over the sparsified tensors), ``layers`` [{``name`` (first consumer node), ``tensor``, ``op``,
``shape``, ``sparsity`` (zero fraction after), ``pruned``, ``criterion``, ``weight_error``
(||dW||/||W||), ``output_error`` (||X dW^T|| / ||X W^T|| on calibration data, sparsegpt
only, else null), ``note``}], ``skipped`` [{``name``, ``tensor``, ``reason``}],
``file_bytes_before``, ``file_bytes_after``, ``compressed_bytes_before``,
``compressed_bytes_after``, ``compression`` ("zstd" or "gzip"), ``calibration`` (data kind
or null), ``fidelity`` (output comparison with the original, see ``onnxprune.measure.quality``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from ... import ir
from ...runtime import taps
from ...data import ArrayData
from ...errors import OnnxPruneError
from .options import CALIBRATED, CRITERIA, MIN_SIZE, Options, Pattern
from .storage import compressed_size, compression_method, model_files
from .sites import Site, find_sites, initializer_arrays, node_label, set_initializers, weights_as_initializers
from .masks import quota, lowest
from .criteria import CRITERION_RULES, Stats, output_error, relative_error

__all__ = ["CALIBRATED", "CRITERIA", "MIN_SIZE", "Options", "Pattern", "Result", "LayerResult", "Site", "Stats",
           "compressed_size", "compression_method", "find_sites", "initializer_arrays", "model_files",
           "relative_error", "require_calibration", "set_initializers", "sparsify", "waves",
           "weights_as_initializers"]

# ---------------------------------------------------------------- driver

@dataclass
class LayerResult:
    name: str
    tensor: str
    op: str
    shape: list[int]
    numel: int
    pruned: int
    sparsity: float
    criterion: str
    weight_error: float
    output_error: float | None = None
    note: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Result:
    proto: onnx.ModelProto
    options: Options
    layers: list[LayerResult]
    skipped: list[dict]
    passes: int = 0

    @property
    def achieved_sparsity(self) -> float:
        n = sum(lr.numel for lr in self.layers)
        return sum(lr.sparsity * lr.numel for lr in self.layers) / n if n else 0.0

    def report(self, saved: dict, calibration: str | None = None) -> dict:
        """The JSON report (stable keys, see the module docstring). ``saved``: the keys of
        :func:`onnxprune.compress.report.save_and_measure`; ``calibration``: what the data was."""
        o = self.options
        return {"sparsity": o.target, "pattern": None if o.pattern is None else str(o.pattern),
                "criterion": o.criterion, "global": o.global_scope, "achieved_sparsity": self.achieved_sparsity,
                "layers": [lr.as_dict() for lr in self.layers], "skipped": self.skipped,
                "calibration": calibration, **saved}


def waves(proto: onnx.ModelProto, sites: list[Site]) -> list[list[Site]]:
    """Sites grouped so that every site's upstream weight layers are in earlier waves."""
    producer: dict[str, tuple[str, list[str]]] = {}
    for i, n in enumerate(proto.graph.node):
        for o in n.output:
            producer[o] = (node_label(n, i), list(n.input))
    owner = {c: s.tensor for s in sites for c in s.consumers}
    memo: dict[str, frozenset] = {}

    def upstream(tensor: str) -> frozenset:
        stack, seen, found = [tensor], set(), set()
        while stack:
            t = stack.pop()
            if t in seen or t not in producer:
                continue
            seen.add(t)
            if t in memo:
                found |= memo[t]
                continue
            label, inputs = producer[t]
            if label in owner:
                found.add(owner[label])
            stack.extend(inputs)
        memo[tensor] = frozenset(found)
        return memo[tensor]

    deps = {s.tensor: upstream(s.input) - {s.tensor} for s in sites}
    done: set[str] = set()
    out: list[list[Site]] = []
    left = list(sites)
    while left:
        wave = [s for s in left if deps[s.tensor] <= done] or left[:1]
        out.append(wave)
        done |= {s.tensor for s in wave}
        left = [s for s in left if s.tensor not in done]
    return out


def collect_stats(proto: onnx.ModelProto, sites: list[Site], full: bool, data: ArrayData, opts: Options,
                  progress=None) -> dict[str, Stats]:
    """Stream calibration batches through ``proto`` and accumulate each site's statistics.

    Only the part of the model upstream of the tapped tensors runs; layers fed by a graph input
    need no run at all.
    """
    stats = {s.tensor: Stats(full) for s in sites}

    def visit(tapped, feed):
        for s in sites:
            x = tapped[s.input] if s.input in tapped else feed[s.input]
            stats[s.tensor].add(s.samples(np.asarray(x, np.float32)))

    inputs = {i.name for i in proto.graph.input}
    tensors = list(dict.fromkeys(s.input for s in sites if s.input not in inputs))
    fixed = fixed_batch(proto)
    limit = min(opts.calib_samples, data.num_samples)
    if fixed:
        limit = limit // fixed * fixed
        if not limit:
            raise OnnxPruneError(f"the model takes batches of exactly {fixed}; give at least {fixed} "
                                 "calibration samples")
    batch = fixed or opts.batch_size
    if tensors:
        taps.tap(upstream_model(proto, tensors), tensors, data, visit, batch_size=batch, limit=limit,
                      progress=progress, description="calibrating")
    else:
        for feed in data.batches(batch, limit):
            visit({}, feed)
    return stats


def upstream_model(proto: onnx.ModelProto, tensors: Sequence[str]) -> onnx.ModelProto:
    """The nodes and initializers of ``proto`` that ``tensors`` depend on, with no graph outputs
    (a calibration run adds ``tensors`` as outputs); ``proto`` itself if it has subgraphs."""
    nodes = proto.graph.node
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in nodes for a in n.attribute):
        return proto
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep: set[int] = set()
    stack = list(tensors)
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(nodes[i].input)
    used = {t for i in keep for t in nodes[i].input}
    sub = onnx.ModelProto()
    for f in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(sub, f, getattr(proto, f))
    sub.opset_import.extend(proto.opset_import)
    sub.functions.extend(proto.functions)
    g = sub.graph
    g.name = proto.graph.name
    inits = {t.name for t in proto.graph.initializer}
    g.input.extend(i for i in proto.graph.input if i.name not in inits or i.name in used)
    g.node.extend(nodes[i] for i in sorted(keep))
    g.initializer.extend(t for t in proto.graph.initializer if t.name in used)
    g.value_info.extend(proto.graph.value_info)
    return sub


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size a model's inputs fix (e.g. 1 for many exports), or None if it is free."""
    firsts = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) and first > 0 else None


def _global_masks(proto: onnx.ModelProto, sites: list[Site], opts: Options) -> dict[str, np.ndarray]:
    arrays = initializer_arrays(proto, [s.tensor for s in sites])
    flat = np.concatenate([np.abs(arrays[s.tensor].astype(np.float64)).ravel() for s in sites])
    mask = lowest(flat, quota(opts.target, flat.size))
    out, at = {}, 0
    for s in sites:
        out[s.tensor] = mask[at:at + s.numel].reshape(s.layout.shape)
        at += s.numel
    return out


def _prune_site(site: Site, w: np.ndarray, opts: Options, stats: Stats | None, global_mask=None
                ) -> tuple[np.ndarray, LayerResult]:
    criterion, note = opts.criterion, ""
    if opts.calibrated and len(site.consumers) > 1:
        criterion, stats = "magnitude", None
        note = f"shared by {len(site.consumers)} layers: one magnitude mask"
    wm = site.layout.to_matrix(w.astype(np.float64))
    if global_mask is not None:
        mask = site.layout.to_matrix(global_mask)
        new = np.where(mask, 0.0, wm)
    else:
        new, mask = CRITERION_RULES[criterion][0](wm, stats, opts)
    dense = site.layout.from_matrix(new).astype(w.dtype)
    res = LayerResult(site.name, site.tensor, site.op, list(site.layout.shape), site.numel, int(mask.sum()),
                      float(np.mean(dense == 0)), criterion, relative_error(new, wm), output_error(wm, new, stats),
                      note)
    return dense, res


def _nm_eligible(sites: list[Site], skipped: list[dict], opts: Options) -> list[Site]:
    if opts.pattern is None:
        return sites
    keep = []
    for s in sites:
        if s.layout.block_len % opts.pattern.m:
            skipped.append({"name": s.name, "tensor": s.tensor,
                            "reason": f"input length {s.layout.block_len} not a multiple of {opts.pattern.m}"})
        else:
            keep.append(s)
    return keep


def require_calibration(opts: Options, has_data: bool) -> None:
    if opts.calibrated and not has_data:
        raise OnnxPruneError(f"--criterion {opts.criterion} needs calibration data: pass --calib DATA.npz "
                             "(or --calib random)")


def sparsify(proto: onnx.ModelProto, opts: Options, data: ArrayData | None = None, progress=None) -> Result:
    """Zero weights of every eligible layer of ``proto`` as ``opts`` says; the input is not modified."""
    require_calibration(opts, data is not None)
    proto = weights_as_initializers(proto)
    sites, skipped = find_sites(proto, min_size=opts.min_size, ignore=opts.ignore)
    sites = _nm_eligible(sites, skipped, opts)
    if not sites:
        raise OnnxPruneError("no Conv/Gemm/MatMul weight is eligible (all skipped: too small, ignored or "
                             "not float); lower --min-size or check --ignore")
    full = CRITERION_RULES[opts.criterion][1]
    gmasks = _global_masks(proto, sites, opts) if opts.global_scope else {}
    plan = waves(proto, sites) if opts.calibrated and opts.sequential else [sites]
    results: dict[str, LayerResult] = {}
    passes = 0
    for wave in plan:
        stats = {}
        if full is not None and any(len(s.consumers) == 1 for s in wave):
            stats = collect_stats(proto, [s for s in wave if len(s.consumers) == 1], full, data, opts, progress)
            passes += 1
        arrays = initializer_arrays(proto, [s.tensor for s in wave])
        new = {}
        for s in wave:
            new[s.tensor], results[s.tensor] = _prune_site(s, arrays[s.tensor], opts, stats.get(s.tensor),
                                                           gmasks.get(s.tensor))
        proto = set_initializers(proto, new)
    layers = [results[s.tensor] for s in sites]
    return Result(proto, opts, layers, skipped, passes)
