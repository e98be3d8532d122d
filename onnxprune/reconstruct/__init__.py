"""Post-pruning reconstruction in closed form from calibration data.

``reconstruct(original, pruned, kept_inputs, data)`` re-fits every layer whose input
channels were pruned so that, fed the *pruned* model's input, it reproduces the
*original* model's output of that layer (only the output channels it still has):

- ``mode="ls"``: ridge least squares with intercept over the kept inputs (He et al. 2017,
  ThiNet, AIMET) for Conv (im2col; grouped and depthwise per group), ConvTranspose
  (as the equivalent stride-1 Conv), Gemm and MatMul. XᵀX and XᵀY are accumulated
  batch by batch in float64; activations are never kept. The damping
  ``ridge * mean(diag(cov X))`` pulls towards the layer's current weights.
- ``mode="bias"``: FLAP bias compensation only, from the original inputs' channel means.
- BatchNormalization statistics are re-estimated by moment matching (both modes).

Targets come from the original model, so errors do not compound; inputs come from the
pruned model as rebuilt so far, so each refit also corrects what pruning upstream
changed. Safety: the last ``holdout`` fraction of the data is never fitted on; a refit
is kept only if it lowers the layer's error on it (computed exactly from the held-out
sums), so reconstruction never makes a layer worse on held-out data.

Order versus cost. Exact layer-by-layer order needs one pass of the pruned model per
dependency level (refits of one level never feed each other, so they share a pass):
about 50 levels on a ResNet-50. That is ``stages=None``. By default the levels are
merged into ``stages=4`` groups: the first level of each group fits on the pruned
model's input as rebuilt so far (exact), the later levels of the group fit on the
original model's input restricted to the kept channels (ThiNet-style: consistent with
upstream refits that reproduce the original, and never over-correcting an error that
an upstream refit of the same group removes). Fitting later levels on stale pruned
inputs instead was tried and diverged on a ResNet-50.

Passes. The original model runs once over the data, for every refit: those that read
only the original accumulate their sums there; the others keep just their sampled
target rows (up to ``cache_bytes``; beyond it they re-run the original in their own
pass) for one pass of the pruned model per group, which runs only as far as the
tensors it taps. A model exported with batch 1 that does not depend on it (checked on
two samples) is tapped in batches of ``FREE_BATCH``. Large feature maps are subsampled
(``positions`` output positions per sample and layer); Gram rows are buffered so that
small batches still make large matrix products. docs/reconstruction.md has the
accuracy and time of each choice.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .. import ir
from ..measure import quality
from ..data import ArrayData
from ..errors import OnnxPruneError
from . import fits, layers, passes
from .report import LayerResult, ReconstructReport

__all__ = ["MODES", "ReconstructReport", "LayerResult", "default_mode", "reconstruct"]

MODES = ("ls", "bias", "none")
FREE_BATCH = 8      # batch for models that fix batch 1 without depending on it (taps of 224x224 CNNs stay < 2 GB)


def default_mode(data: ArrayData | None) -> str:
    """``ls`` with real calibration data, ``none`` without data or with random data."""
    return "ls" if data is not None and data.kind != "random" else "none"


def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, kept_inputs: dict[str, np.ndarray],
                data: ArrayData, *, mode: str = "ls", ridge: float = 1e-3, holdout: float = 0.25,
                batch_size: int = 32, progress: passes.Progress | None = None,
                kept_outputs: dict[str, np.ndarray] | None = None, bn_recalibrate: bool = True,
                stages: int | None = 4, positions: int | None = 64, fidelity: bool = True,
                fidelity_samples: int = 64, cache_bytes: int = 1 << 30,
                seed: int = 0) -> tuple[onnx.ModelProto, ReconstructReport]:
    """Refit the pruned layers listed in ``kept_inputs``; returns the new model and a report.

    ``kept_inputs[node]`` / ``kept_outputs[node]``: indices, in the ORIGINAL layer's channel
    space, of the input / output channels the pruned layer keeps (output channels are found
    by matching weights when not given). ``stages`` caps the passes over the data (None: one
    per dependency level, exact order). ``positions`` caps the output positions sampled per
    sample and layer (None: all). ``fidelity_samples`` caps the held-out samples the final
    fidelity check runs. ``cache_bytes`` caps the sampled targets kept between the original
    model's pass and the pruned model's passes (refits beyond it rerun the original).
    """
    start = time.perf_counter()
    _check_args(mode, ridge, holdout, batch_size, stages, positions, data)
    report = ReconstructReport(mode, ridge, holdout, positions=positions)
    if mode == "none":
        return pruned, report
    fixed = _fixed_batch(original)
    free = False
    if fixed == 1 and batch_size > 1 and data.num_samples >= 2 and passes.batch_is_free(original, data):
        free, fixed = True, None
        batch_size = min(batch_size, FREE_BATCH)
        report.notes.append(f"the model fixes batch 1 but does not depend on it: taps run batches of {batch_size}")
    if fixed and fixed != batch_size:
        batch_size = fixed
        if data.num_samples % fixed:
            data = data.split(data.num_samples - data.num_samples % fixed)[0]
        report.notes.append(f"the model's batch dimension is fixed: batches of {fixed}")
    n_held = int(round(data.num_samples * holdout))
    n_held = min(max(n_held, 1), data.num_samples - 1) if holdout > 0 else 0
    n_held -= n_held % (fixed or 1)
    fit_data, held_data = data.split(data.num_samples - n_held)
    report.fit_samples, report.holdout_samples = fit_data.num_samples, held_data.num_samples
    if not n_held:
        report.notes.append("no held-out data: refits were checked on the data they were fitted on")

    work = ir.to_graph(pruned).toposort()
    ref = ir.to_graph(original)
    todo = _build(mode, work, ref, kept_inputs, kept_outputs or {}, bn_recalibrate, ridge, positions, seed, report)
    level = passes.levels(work, {f.result.node for f in todo})
    report.levels = max(level.values(), default=-1) + 1
    schedule: dict[int, list[fits.Fit]] = {}
    for f in todo:
        f.result.stage = passes.stage_of(level[f.result.node], report.levels, stages)
        schedule.setdefault(f.result.stage, []).append(f)
    for stage in schedule.values():
        first = min(level[f.result.node] for f in stage)
        for f in stage:
            if level[f.result.node] > first:
                f.from_original()
    report.stages = len(schedule)

    clock = {"passes": 0.0, "solve": 0.0, "fidelity": 0.0}
    t = time.perf_counter()
    report.cached_mb = _original_pass(todo, original, fit_data, held_data, batch_size, progress, cache_bytes,
                                      free)
    report.passes = int(any(f.original and not f.live for f in todo))
    clock["passes"] += time.perf_counter() - t
    for i, stage in enumerate(sorted(schedule)):
        t = time.perf_counter()
        report.passes += _pruned_pass(schedule[stage], original, work, pruned, fit_data, held_data, batch_size,
                                      progress, f"reconstructing {i + 1}/{report.stages}", free)
        clock["passes"] += time.perf_counter() - t
        t = time.perf_counter()
        for f in schedule[stage]:
            f.solve()
            f.apply(work)
        clock["solve"] += time.perf_counter() - t
    result = ir.from_graph(work, pruned)
    if fidelity:
        t = time.perf_counter()
        check = held_data if n_held else fit_data
        check = check.split(min(fidelity_samples, check.num_samples))[0]
        report.fidelity = _fidelity(original, pruned, result, check, batch_size, free)
        report.fidelity_samples = check.num_samples
        clock["fidelity"] = time.perf_counter() - t
    report.timing = {k: round(v, 2) for k, v in clock.items()}
    report.seconds = time.perf_counter() - start
    return result, report


def _check_args(mode, ridge, holdout, batch_size, stages, positions, data) -> None:
    if mode not in MODES:
        raise OnnxPruneError(f"--reconstruct {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none":
        return
    if not ridge >= 0:
        raise OnnxPruneError(f"ridge must be >= 0, got {ridge}")
    if not 0 <= holdout < 1:
        raise OnnxPruneError(f"holdout must be in [0, 1), got {holdout}")
    if batch_size < 1 or (stages is not None and stages < 1) or (positions is not None and positions < 1):
        raise OnnxPruneError("batch_size, stages and positions must be positive")
    if data is None or data.num_samples < 2:
        raise OnnxPruneError("reconstruction needs calibration data with at least 2 samples (--calib FILE.npz)")


def _fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size every input of ``proto`` fixes, if any (exports often fix it to 1)."""
    firsts = {(ir.input_dims(vi) or [None])[0] for vi in ir.graph_inputs(proto)}
    b = firsts.pop() if len(firsts) == 1 else None
    return b if isinstance(b, int) and b > 0 else None


def _original_pass(todo: list[fits.Fit], original: onnx.ModelProto, fit_data: ArrayData, held_data: ArrayData,
                   batch_size: int, progress, budget: int, free: bool) -> float:
    """One pass of the original model for every refit that is not live; returns the MB queued.

    Refits that need nothing else accumulate their sums; the others queue their sampled
    targets for their stage's pass over the pruned model, in stage order as long as the
    queues fit in ``budget`` bytes (estimated from the first batch); the rest go live.
    """
    todo = [f for f in todo if f.original and not f.live]
    if not todo:
        return 0.0
    tap = passes.Tapper(original, [t for f in todo for t in f.original], free)
    steps = passes.num_batches(fit_data, held_data, batch_size)
    for i, (flags, feed) in enumerate(passes.batches(fit_data, held_data, batch_size, progress,
                                                     "reconstructing: original model")):
        got = tap(feed)
        for f in todo:
            for held in flags:
                f.add_original(got, held)
        if i == 0:
            todo = _within_budget(todo, steps, budget)
    return round(sum(f.queued_bytes() for f in todo) / 2 ** 20, 1)


def _within_budget(todo: list[fits.Fit], steps: int, budget: int) -> list[fits.Fit]:
    """Keep queueing for refits, earliest stage first, while the projected queues fit in ``budget``."""
    total = 0
    for f in sorted((f for f in todo if f.pruned), key=lambda f: f.result.stage):
        total += f.queued_bytes() * steps
        if total > budget:
            f.go_live()
    return [f for f in todo if not f.live]


def _pruned_pass(stage: list[fits.Fit], original: onnx.ModelProto, work: gs.Graph, pruned: onnx.ModelProto,
                 fit_data: ArrayData, held_data: ArrayData, batch_size: int, progress, description: str,
                 free: bool) -> bool:
    """One pass of the pruned model as rebuilt so far, for the refits of one stage that need it.

    Live refits get the original model's tensors in the same pass (a second session).
    Returns whether a pass was made."""
    need = [f for f in stage if f.pruned]
    if not need:
        return False
    live = [f for f in need if f.live and f.original]
    tap_p = passes.Tapper(ir.from_graph(work, pruned), [t for f in need for t in f.pruned], free)
    tap_o = passes.Tapper(original, [t for f in live for t in f.original], free) if live else None
    for flags, feed in passes.batches(fit_data, held_data, batch_size, progress, description):
        got_o = tap_o(feed) if tap_o is not None else {}
        got_p = tap_p(feed)
        for held in flags:
            for f in live:
                f.add_original(got_o, held)
            for f in need:
                f.add_pruned(got_p, held)
    return True


def _build(mode, work: gs.Graph, ref: gs.Graph, kept_inputs, kept_outputs, bn_recalibrate, ridge, positions, seed,
           report: ReconstructReport) -> list[fits.Fit]:
    """The refits to run; layers that cannot be refit go to the report as skipped."""
    nodes = {n.name: n for n in work.nodes}
    refs = {n.name: n for n in ref.nodes}
    made: list[fits.Fit | LayerResult] = []
    for i, (name, kin) in enumerate(kept_inputs.items()):
        kin = np.sort(np.asarray(kin, dtype=np.int64).reshape(-1))
        made.append(_layer_fit(mode, name, kin, nodes.get(name), refs.get(name), kept_outputs.get(name),
                               ridge, positions, seed + i))
    if bn_recalibrate:
        below = passes.downstream(work, {n for n in kept_inputs if n in nodes})
        made += [_bn_fit(n, refs.get(n.name), positions, seed + len(made) + i) for i, n in enumerate(work.nodes)
                 if n.op == "BatchNormalization" and n.name in below]
    report.layers += [m if isinstance(m, LayerResult) else m.result for m in made]
    return [m for m in made if not isinstance(m, LayerResult)]


def _layer_fit(mode, name, kin, node, ref, kout, ridge, positions, seed) -> fits.Fit | LayerResult:
    kind = "ls" if mode == "ls" else "bias"
    op = node.op if node is not None else (ref.op if ref is not None else "?")
    why = lambda reason: fits.skipped(name, op, kind, reason)  # noqa: E731
    if node is None or ref is None:
        return why(f"not in the {'pruned' if node is None else 'original'} model")
    if node.op != ref.op:
        return why(f"op changed from {ref.op} to {node.op}")
    lin, reason = layers.linear(node)
    olin, oreason = layers.linear(ref)
    if lin is None or olin is None:
        return why(reason or oreason)
    users = len(node.inputs[1].outputs)
    if users > 1:
        return why(f"weight '{node.inputs[1].name}' is shared by {users} nodes")
    if isinstance(node.inputs[0], gs.Constant):
        return why("input is a constant")
    if len(kin) and (kin.min() < 0 or kin.max() >= olin.cin):
        raise ValueError(f"kept_inputs['{name}'] has indices outside 0..{olin.cin - 1}")
    if kout is None:
        kout = np.arange(lin.cout) if lin.cout == olin.cout else layers.match_rows(olin.signatures(kin),
                                                                                   lin.signatures())
        if kout is None:
            return why("cannot match pruned output channels to the original's; pass kept_outputs")
    kout = np.asarray(kout, dtype=np.int64).reshape(-1)
    result = LayerResult(name, node.op, kind, kept_in=len(kin), total_in=olin.cin)
    if mode == "ls":
        return fits.LeastSquares(lin, kin, kout, result, ridge=ridge, positions=positions, seed=seed)
    if len(kin) == olin.cin:
        return why("no input channel was removed")
    return fits.BiasShift(lin, olin, kin, kout, result)


def _bn_fit(node: gs.Node, ref: gs.Node | None, positions: int | None, seed: int) -> fits.Fit | LayerResult:
    why = lambda reason: fits.skipped(node.name, node.op, "bn", reason)  # noqa: E731
    if ref is None:
        return why("not in the original model")
    if int(node.attrs.get("training_mode", 0)) or len(node.outputs) != 1:
        return why("training-mode BatchNormalization")
    params = [layers.const_input(n, i) for n in (node, ref) for i in range(1, 5)]
    if any(p is None for p in params):
        return why("parameters are not constants")
    rows = lambda ps: [r.tobytes() for r in np.stack([p.values.astype(np.float64) for p in ps], 1)]  # noqa: E731
    kept = layers.match_rows(rows(params[4:]), rows(params[:4]))
    if kept is None:
        return why("cannot match channels to the original's")
    c = len(kept)
    return fits.BatchNormStats(node, ref, kept, LayerResult(node.name, node.op, "bn", c, len(params[4].values)),
                               positions=positions, seed=seed)


def _fidelity(original, before, after, data: ArrayData, batch_size: int, free: bool) -> dict:
    """Relative error and top-1 agreement of the first output, pruned and reconstructed vs original
    (the original runs once; batches as in the passes)."""
    name = original.graph.output[0].name
    taps = [passes.Tapper(m, [name], free) for m in (original, before, after)]
    agree = {"pruned": quality.Agreement(name), "reconstructed": quality.Agreement(name)}
    for feed in data.batches(batch_size):
        ref = taps[0](feed)[name]
        for a, tap in zip(agree.values(), taps[1:]):
            a.update(tap(feed)[name], ref)
    return {key: {k: v for k, v in a.result().items() if k in ("rel_error", "top1_agreement") and v is not None}
            for key, a in agree.items()}
