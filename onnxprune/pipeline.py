"""The prune pipeline: load -> analyze -> score -> plan -> rewrite -> verify -> (reconstruct) -> measure.

:class:`Pruner` is the engine: it loads, analyses and scores a model once, then makes plans and
verified results from it. ``prune()`` is the Python API (one policy or plan, one result);
``onnxprune prune`` and ``onnxprune sensitivity`` drive a ``Pruner`` themselves, because budget
search and sensitivity make many results from one analysis (see ``search/``). Each step lives in
its own module; this file only wires them together and times them. Every report format is built
from the one :class:`PruneResult` (``report()`` for JSON, :mod:`onnxprune.report` for Markdown).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from . import fold, ir, rewrite, runtime, verify as verify_mod
from .measure import counts, latency, quality
from .measure.clock import peak_rss_mb, stage_time
from .analysis import analyze
from .data import ArrayData, bind_shapes, open_data, random_feed
from .errors import OnnxPruneError, VerificationError
from .ir.ortops import FLOAT_NOTE, float_activations, int8_activations, ort_load
from .groups import Analysis
from .plan import Plan, Policy, make_plan
from .train.finetune import finetune as train_finetune


@dataclass
class PruneResult:
    proto: onnx.ModelProto
    original: ir.Model
    analysis: Analysis
    plan: Plan
    rewrite: rewrite.RewriteResult
    verification: verify_mod.Verification | None
    before: counts.ModelStats
    after: counts.ModelStats
    criterion: str
    data_source: str
    seconds: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    serialized: tuple[onnx.ModelProto, bytes] | None = field(default=None, repr=False)  # (proto, its bytes)

    def proto_bytes(self) -> bytes | None:
        """``proto`` serialized, if it was already (for verification) and has not been replaced since."""
        return self.serialized[1] if self.serialized is not None and self.serialized[0] is self.proto else None

    def report(self) -> dict:
        """The JSON report (stable keys, see README)."""
        a = self.analysis
        pruned_ids = {gid for gid, r in self.plan.removed.items() if len(r)}
        return {
            "model": str(self.original.path) if self.original.path else None,
            "criterion": self.criterion,
            "importance_data": self.data_source,
            "params_before": self.before.params, "params_after": self.after.params,
            "macs_before": self.before.macs, "macs_after": self.after.macs,
            "file_bytes_before": self.original.file_bytes,
            "groups_found": len(a.groups),
            "groups_pruned": len(pruned_ids),
            "groups_frozen": len(a.frozen),
            "verified": bool(self.verification.passed) if self.verification is not None else False,
            "verification": self.verification.to_json() if self.verification is not None else None,
            "input_shapes": a.input_shapes,
            "kv_cache": a.kv_cache,
            "groups": self.rewrite.groups,
            "frozen": [{"group": g.id, "label": g.label, "structure": g.structure, "size": g.size, "reasons": g.reasons}
                       for g in a.frozen if g.size > 1],
            "barriers": [{"node": b.node, "op": b.op, "reason": b.reason} for b in a.barriers],
            "notes": self.plan.notes,
            "seconds": self.seconds,
            **self.extra,
        }


def verification_feeds(proto: onnx.ModelProto, input_shapes: dict[str, list[int]],
                       data: ArrayData | None = None, n_random: int = 1) -> list[dict[str, np.ndarray]]:
    """Random batches at the analysis shapes, plus one real batch when data is given.

    One random batch is enough: besides the outputs, up to 48 intermediate tensors that lost
    channels are compared, so a wrong slice anywhere shows on the first batch."""
    feeds = [random_feed(proto, input_shapes, seed=s) for s in range(n_random)]
    if data is not None and data.kind != "random":
        batch = min(s[0] for s in input_shapes.values() if s) if input_shapes else 1
        real = next(data.batches(max(1, batch)), None)
        if real is not None and all(list(v.shape) == input_shapes[k] for k, v in real.items()):
            feeds.append(real)
    return feeds


class Pruner:
    """One model loaded, analysed and scored once; plans and candidates from it are cheap.

    ``prune()`` is ``Pruner(...).finish(pruner.plan(policy))``; budget search and sensitivity
    analysis build many candidates from one Pruner.
    """

    def __init__(self, model: str | os.PathLike | ir.Model, *, criterion: str = "l2",
                 group_reduction: str = "mean", input_shapes: dict[str, list[int]] | None = None,
                 calib: str | ArrayData | None = None, split_carrier: str = "largest", progress=None,
                 score: bool = True, kv_cache: bool = False):
        from .importance import ScoreContext, fallback_summary, requires_data, score_groups

        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}   # stage -> peak resident MB at its end
        self.reconstruct_options: dict = {}   # defaults for every finish() (e.g. {"stages": 1})
        self.criterion, self.progress = criterion, progress
        with stage_time(self.seconds, "load", self.peaks):
            self.original = model if isinstance(model, ir.Model) else ir.load(model, lazy=True)
            ir.checks.check_finite(self.original.proto)  # NaN/inf weights: the model's problem, named
            self.original = fold.fold_model(self.original)  # constant subgraphs -> constants the rules can slice
        with stage_time(self.seconds, "analyze", self.peaks):
            # real calibration data is opened first: its samples bind the model's symbolic dims
            no_calib = calib is None or isinstance(calib, str) and calib == "random"
            data = None if no_calib else calib_data(calib, self.original.proto, input_shapes or {})
            shapes = input_shapes if data is None else bind_shapes(self.original.proto, data, input_shapes)
            self.analysis = analyze(self.original, shapes, split_carrier=split_carrier, kv_cache=kv_cache)
        self.data = data if data is not None else open_data(calib, self.original.proto, self.analysis.input_shapes)
        self.trial = None   # --criterion auto: the candidates' scores until finish() picks one
        if score and criterion == "auto" and (self.data is None or self.data.kind == "random"):
            raise OnnxPruneError("--criterion auto compares criteria on real calibration data: add --calib DATA "
                                 "(an .npz or an image folder), or name a criterion such as l2")
        if score and criterion != "auto" and requires_data(criterion) and self.data is None:
            raise OnnxPruneError(f"criterion '{criterion}' needs calibration data: add --calib DATA.npz "
                                 "(or --calib random)")
        self.scores: dict[int, np.ndarray] = {}
        self.score_notes: list[str] = []
        if score and criterion == "auto":
            from .search.criterion import Trial

            with stage_time(self.seconds, "score", self.peaks):
                self.trial = Trial(self, reduction=group_reduction)
            self.scores = self.trial.scores[self.trial.candidates[0]]   # budget counts do not depend on it
        elif score:
            with stage_time(self.seconds, "score", self.peaks):
                ctx = ScoreContext(self.original.proto, self.analysis, data=self.data, progress=progress)
                self.scores = score_groups(self.analysis.prunable, ctx, criterion, group_reduction)
            self.score_notes = fallback_summary(ctx, criterion)
        self._before: counts.ModelStats | None = None

    @property
    def before(self) -> counts.ModelStats:
        if self._before is None:
            self._before = counts.summarize(self.original.proto, self.analysis.input_shapes)
        return self._before

    def plan(self, policy: Policy) -> Plan:
        with stage_time(self.seconds, "plan"):
            plan = make_plan(self.analysis, self.scores, policy)
        plan.policy = policy   # --criterion auto re-plans at the same policy with the criterion it picks
        return plan

    def _choose_criterion(self, plan: Plan, seconds: dict, peaks: dict) -> Plan:
        """With ``--criterion auto``: run the trial once at ``plan``'s policy and return the winner's plan."""
        from .importance import fallback_summary

        if self.trial is None or plan.policy is None:
            return plan
        if self.trial.chosen is None:
            with stage_time(self.seconds, "criterion_trial"):
                self.trial.choose(self, plan.policy)
            seconds["criterion_trial"] = self.seconds["criterion_trial"]
            peaks["criterion_trial"] = peak_rss_mb()
            self.criterion = self.trial.chosen
            self.scores = self.trial.scores[self.criterion]
            self.trial.ctx.fallbacks = dict(self.trial.fallbacks[self.criterion])
            self.score_notes = fallback_summary(self.trial.ctx, self.criterion)
        return make_plan(self.analysis, self.scores, plan.policy)

    def candidate(self, plan: Plan) -> tuple[rewrite.RewriteResult, counts.ModelStats]:
        """The rewritten (unverified) model for ``plan`` and its params/MACs."""
        result = rewrite.apply(self.analysis, plan.removed, self.original)
        return result, counts.summarize(result.proto, result.input_shapes)

    def finish(self, plan: Plan | dict, *, verify: bool = True, rtol: float = 1e-4, reconstruct: str = "auto",
               reconstruct_options: dict | None = None) -> PruneResult:
        """Rewrite, check, verify, reconstruct and measure ``plan``."""
        seconds, analysis, original, data = dict(self.seconds), self.analysis, self.original, self.data
        peaks = dict(self.peaks)
        the_plan = plan if isinstance(plan, Plan) else Plan.from_json(plan, analysis)
        the_plan = self._choose_criterion(the_plan, seconds, peaks)
        with stage_time(seconds, "rewrite", peaks):
            result = rewrite.apply(analysis, the_plan.removed, original)
            gc.collect()  # the rewrite's graph holds sliced weights in reference cycles: free them now
            data_bytes = _serialize(result.proto, original)  # verified and saved as they are
            _check_like(result.proto, original.proto)
        ver = None
        if verify:
            with stage_time(seconds, "verify", peaks):
                feeds = verification_feeds(original.proto, analysis.input_shapes, data)
                if analysis.varied_shapes:  # shape values were folded: check at other symbolic sizes too
                    feeds.append(random_feed(original.proto, analysis.varied_shapes, seed=1))
                int8 = int8_activations(original.proto)   # int8-rounded activations compare at float
                ver = verify_mod.verify(float_activations(original.proto) if int8 else original,
                                        float_activations(result.proto) if int8 else result.proto,
                                        result.removed_positions, analysis.shapes, feeds, rtol=rtol,
                                        pruned_bytes=None if int8 else data_bytes)
            if not ver.passed:
                _blame_target(ver, lambda: verify_mod.verify(original, result.proto, result.removed_positions,
                                                             analysis.shapes, feeds, rtol=rtol,
                                                             pruned_bytes=data_bytes))
                culprits = _culprits(analysis, the_plan, original, feeds, rtol)
                raise VerificationError(f"{_describe_failure(ver)}; failing group(s): {culprits}")
        extra = {}
        if verify and int8:
            extra["validity"] = [FLOAT_NOTE]
        if original.meta.get("validity"):   # contrib ops: onnxruntime's load checks what the checker cannot
            if not verify:
                ort_load(data_bytes if data_bytes is not None else result.proto.SerializeToString(), "pruned model")
            extra.setdefault("validity", []).append(original.meta["validity"] + " and the pruned model (" +
                                                    ("its verification ran there)" if verify else
                                                     "loaded, not verified)"))
        final = result.proto
        no_data = data is None or data.kind == "random"   # auto means none then: reconstruct is not imported
        mode = "none" if reconstruct == "none" or (reconstruct == "auto" and no_data) else None
        if mode is None:
            from . import reconstruct as recon

            mode = recon.default_mode(data) if reconstruct == "auto" else reconstruct
            if mode not in recon.MODES:
                raise OnnxPruneError(f"--reconstruct '{reconstruct}': expected one of auto, {', '.join(recon.MODES)}")
        if mode != "none":
            if data is None:
                raise OnnxPruneError(f"--reconstruct {mode} needs calibration data: add --calib DATA.npz")
            with stage_time(seconds, "reconstruct", peaks):
                final, rep = recon.reconstruct(original.proto, result.proto, result.kept_inputs, data, mode=mode,
                                               kept_outputs=result.kept_outputs, progress=self.progress,
                                               **{**self.reconstruct_options, **(reconstruct_options or {})})
            extra["reconstruction"] = rep.to_json()
        extra["reconstruct_mode"] = mode
        extra["importance_fallbacks"] = self.score_notes
        extra["criterion_trial"] = self.trial.report if self.trial is not None and self.trial.chosen else None
        extra["peak_rss_mb"] = peaks
        with stage_time(seconds, "measure", peaks):
            after = counts.summarize(final, result.input_shapes)
        source = "none" if data is None else data.kind
        # the verified bytes are the model to save only if no refit changed its weights since
        saved = (final, data_bytes) if data_bytes is not None and mode == "none" else None
        return PruneResult(final, original, analysis, the_plan, result, ver, self.before, after, self.criterion,
                           source, seconds, extra, serialized=saved)


def prune(model: str | os.PathLike | ir.Model, *, policy: Policy | None = None, criterion: str = "l2",
          group_reduction: str = "mean", input_shapes: dict[str, list[int]] | None = None,
          calib: str | ArrayData | None = None, plan: Plan | dict | None = None, verify: bool = True,
          split_carrier: str = "largest", progress=None, rtol: float = 1e-4,
          reconstruct: str = "auto", reconstruct_options: dict | None = None,
          kv_cache: bool = False, slice_hidden: bool = False, hidden_width: int | None = None,
          hidden_keep: float | None = None, round_to: int = 8, providers: list[str] | None = None,
          session_options: dict | None = None) -> PruneResult:
    """Prune ``model`` and verify the result against the masked original.

    ``kv_cache=True`` lets KV-cache graph inputs (``past_key_values.*``, ``past_*``) and outputs
    (``present.*``) shrink with their heads (``onnxprune prune --kv-cache``); otherwise every graph
    input and output keeps its shape.

    ``slice_hidden``: first rotate the residual stream of a normalised transformer (verified exact) and
    keep ``hidden_width`` directions (or ``hidden_keep`` of them, a multiple of ``round_to``), chosen by
    PCA of ``calib`` (see :mod:`onnxprune.hidden`); then ``policy`` prunes channels of the sliced model
    (nothing unless a policy is given). The report's ``hidden`` key states what was verified.

    ``providers`` (onnxruntime execution providers, in order) and ``session_options`` (onnxruntime
    SessionOptions attributes or dotted config entries) reach every session the pipeline opens;
    without them the current :func:`runtime.use` target applies (by default onnxruntime on the CPU).
    The report's ``runtime`` entry counts the sessions this call opened and what each got.

    Raises :class:`OnnxPruneError` for bad input and :class:`VerificationError`
    when the pruned model does not match its masked original (a bug).
    """
    here = runtime.current()  # its settings, with a count of this call's sessions alone
    target = runtime.Target(here.runtime, providers or here.providers, {**here.options, **(session_options or {})},
                            here.device, outer=here)
    with runtime.use(target):
        if slice_hidden:
            result = prune_sliced(model, policy=policy or Policy(ratio=0.0), criterion=criterion, calib=calib,
                                  input_shapes=input_shapes, width=hidden_width, keep=hidden_keep, round_to=round_to,
                                  verify=verify, rtol=rtol, reconstruct=reconstruct, progress=progress)
        else:
            policy = policy or Policy()
            policy.check()
            pruner = Pruner(model, criterion=criterion, group_reduction=group_reduction, input_shapes=input_shapes,
                            calib=calib, split_carrier=split_carrier, progress=progress, score=plan is None,
                            kv_cache=kv_cache)
            result = pruner.finish(pruner.plan(policy) if plan is None else plan, verify=verify, rtol=rtol,
                                   reconstruct=reconstruct, reconstruct_options=reconstruct_options)
    result.extra["runtime"] = target.to_json()
    return result


def calib_data(spec: str | ArrayData | None, proto: onnx.ModelProto, input_shapes: dict[str, list[int]]
               ) -> ArrayData | None:
    """Calibration data; for a causal LM (an ``input_ids`` input) an .npz of token ids whose missing
    ``attention_mask``/``position_ids`` are made (see :mod:`measure.perplexity`)."""
    from .measure import perplexity

    if isinstance(spec, (str, os.PathLike)) and spec != "random" and perplexity.is_causal_lm(proto) \
            and str(spec).endswith(".npz") and os.path.isfile(spec):
        with np.load(spec) as z:
            if any(vi.name not in z.files for vi in ir.graph_inputs(proto)):
                return perplexity.token_data(spec, proto, input_shapes)
    return open_data(spec, proto, input_shapes)


def prune_sliced(model: str | os.PathLike | ir.Model, *, policy: Policy, criterion: str = "l2",
                 calib: str | ArrayData | None = None, input_shapes: dict[str, list[int]] | None = None,
                 width: int | None = None, keep: float | None = None, round_to: int = 8, verify: bool = True,
                 rtol: float = 1e-4, reconstruct: str = "auto", progress=None) -> PruneResult:
    """The hidden-width stage (rotate, verify, slice) then the channel pipeline on the sliced model.

    The result's ``original`` and ``before`` are the input model's; its ``verification`` is the
    channel pruning's against the sliced model, and ``extra["hidden"]`` the rotation's against the
    input model (see :class:`hidden.HiddenResult`)."""
    from . import hidden

    seconds: dict[str, float] = {}
    with stage_time(seconds, "load"):
        original = model if isinstance(model, ir.Model) else ir.load(model)
        ir.materialize(original)
        data = calib_data(calib, original.proto, input_shapes or {})
    with stage_time(seconds, "slice_hidden"):
        # the loaded model is ours: node names and no-op casts are fixed in place, not in a copy
        h = hidden.slice_hidden(original, data, width=width, keep=keep, round_to=round_to, verify=verify, rtol=rtol,
                                progress=progress, inplace=not isinstance(model, ir.Model))
    policy.check()
    shapes = input_shapes or {}
    if data is not None and data.kind != "random":
        shapes = bind_shapes(original.proto, data, input_shapes)
    shapes = ir.resolve_input_shapes(original.proto, shapes)
    if policy.ratio > 0 or any(r > 0 for r in policy.ratio_for.values()):
        pruner = Pruner(ir.Model(h.proto), criterion=criterion, input_shapes=input_shapes, calib=data,
                        progress=progress)
        result = pruner.finish(pruner.plan(policy), verify=verify, rtol=rtol, reconstruct=reconstruct)
        result.seconds = {**seconds, **result.seconds}
    else:   # slicing alone: the verification is the rotation's
        with stage_time(seconds, "measure"):
            after = counts.summarize(h.proto, shapes)
        result = PruneResult(h.proto, original, Analysis([], [], {}, shapes), Plan({}),
                             rewrite.RewriteResult(h.proto, {}, input_shapes=shapes), h.rotation, after, after,
                             "none", "none" if data is None else data.kind, seconds)
        result.extra["peak_rss_mb"] = {"end": peak_rss_mb()}
    result.extra["hidden"] = h.to_json()
    result.original = original
    result.before = counts.summarize(original.proto, shapes)
    result.plan.notes.append(f"hidden width {h.width_before} -> {h.width_after} (rotation verified exact: "
                             f"{bool(h.rotation and h.rotation.passed)}; slicing is approximate, measure it "
                             "with --data)")
    return result


def evaluate(result: PruneResult, data: ArrayData, *, bench_runs: int = 20, batch_size: int = 64,
             progress=None) -> dict:
    """Before/after accuracy (with labels), fidelity to the original, or perplexity (token data from
    :func:`measure.perplexity.token_data`), and interleaved latency.

    Stored in ``result.extra["validation"]`` and returned.
    """
    t = time.perf_counter()
    out: dict = {"data": data.source or data.kind, "samples": data.num_samples}
    if data.kind == "tokens":  # a causal LM on token ids (measure.perplexity.token_data)
        from .measure import perplexity

        after, before = perplexity.perplexities([result.proto, result.original.proto], data,
                                                batch_size=min(batch_size, 8))
        out["perplexity_before"], out["perplexity_after"] = before, after
        out["perplexity_ratio"] = (after["perplexity"] / before["perplexity"]
                                   if before["perplexity"] and after["perplexity"] is not None else None)
    else:
        m = quality.compare(result.proto, data, result.original.proto, batch_size=batch_size, output=None,
                            want_accuracy=data.labels is not None, progress=progress)
        out["accuracy_before"] = m.reference_accuracy
        out["accuracy_after"] = m.accuracy
        out["fidelity"] = m.fidelity
    if bench_runs:
        bench = latency.benchmark({"after": result.proto, "before": result.original.proto}, warmup=5,
                                  runs=bench_runs, input_shapes=result.rewrite.input_shapes or result.analysis.input_shapes)
        out["latency_ms_before"] = bench["before"].p50
        out["latency_ms_after"] = bench["after"].p50
        out["latency_ratio"] = bench.ratio_p50
        out["latency_threads"] = bench["before"].threads
    result.seconds["validate"] = round(time.perf_counter() - t, 4)
    result.extra["validation"] = out
    return out


def finetune(result: PruneResult, data: ArrayData, config=None, *, progress=None, log=None) -> dict:
    """Fine-tune the pruned model against the original (distillation, plus cross-entropy when ``data``
    has labels; see :mod:`onnxprune.train.finetune`). ``result.proto`` becomes the best checkpoint and
    ``result.extra["finetune"]`` the run summary, which is returned."""
    with stage_time(result.seconds, "finetune"):
        teacher = ir.materialize(result.original).proto  # a lazily loaded model's weights, all in memory
        run = train_finetune(result.proto, data, teacher=teacher, config=config, progress=progress, log=log)
    result.proto = run.proto
    result.extra["finetune"] = run.to_json()
    return result.extra["finetune"]


def _check_like(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """onnx.checker must pass on the pruned model at every level it passes on the original.

    The pruned model is checked on its skeleton: its weights are arrays onnxprune sliced and wrote
    itself (the checker would only re-parse them), every node, attribute, type and shape is checked."""
    for full in (True, False):
        try:
            ir.check(original, full=full)
        except Exception:
            continue  # the input already fails this level: demand the next one
        try:
            ir.check(pruned, full=full, weights=False)
            return
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise VerificationError(f"the pruned model fails onnx.checker: {first}") from None


def _blame_target(ver: verify_mod.Verification, again) -> None:
    """A failure on a target other than onnxruntime's CPU provider is checked again there: when the
    pruned model is right on the CPU, the target computes the graph differently, and the error says so."""
    if runtime.current().cpu_only:
        return
    with runtime.use(runtime.Target(outer=runtime.current())):
        cpu = again()
    if cpu.passed:
        raise VerificationError(f"the pruned model matches its masked original in onnxruntime on the CPU "
                                f"(worst relative error {cpu.needed_rtol:.1e}) but not in "
                                f"{ver.checked_by.get('deployed', 'the target runtime')}: {_describe_failure(ver)}; "
                                "the target runtime computes this graph differently (run its own accuracy check "
                                "with --data, or prune for --runtime onnxruntime)")


def _describe_failure(ver: verify_mod.Verification) -> str:
    if ver.error:
        return ver.error
    bad = [o for o in ver.outputs if not o.passed]
    o = bad[0]
    return (f"output '{o.name}' differs from the masked original by {o.max_abs:.3g} "
            f"(allowed {o.tolerance:.3g}, relative {o.max_abs / max(o.scale, 1e-30):.3g})")


def _culprits(analysis: Analysis, plan: Plan, original: ir.Model, feeds, rtol: float) -> str:
    """Prune each group alone to name the ones whose rewrite is wrong."""
    bad = []
    for gid, removed in plan.removed.items():
        if len(removed) == 0:
            continue
        try:
            r = rewrite.apply(analysis, {gid: removed}, original)
            ok = verify_mod.verify(original, r.proto, r.removed_positions, analysis.shapes, feeds,
                                   rtol=rtol).passed
        except Exception:
            ok = False
        if not ok:
            bad.append(f"{gid} ('{analysis.groups[gid].label}')")
    return ", ".join(bad[:10]) or "none alone (an interaction between groups)"


def _serialize(proto: onnx.ModelProto, original: ir.Model) -> bytes | None:
    """The bytes that both verification and ``save`` use, for a model saved in one piece."""
    if original.external or ir.proto_bytes(proto) >= ir.TWO_GB:
        return None
    return proto.SerializeToString()


def save(result: PruneResult, path: str | os.PathLike) -> int:
    """Write the pruned model (the bytes verification ran, when it ran on this very model), and beside
    it updated copies of a ``genai_config.json``/``config.json`` found beside the input (see configs).
    The report then names the file (``output``) and its size (``file_bytes_after``); returns the size."""
    from . import configs

    size = ir.save(result.proto, path, source=result.original.path, external=result.original.external,
                   data=result.proto_bytes())
    result.extra.update(output=str(path), file_bytes_after=size)
    notes = configs.write_beside(result.original.proto, result.proto, result.original.path, Path(path))
    if notes:
        result.extra["configs"] = notes
    return size
