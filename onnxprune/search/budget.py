"""Budgets: find the pruning strength that meets a MACs, params or latency target, under an accuracy floor.

Design: the policy (uniform ratio per group, or ``--global`` ranking) is kept and
only its strength ``ratio`` is searched, by bisection on measured numbers: MACs
and params of the rewritten candidate, or onnxruntime latency of the candidate
against the original (interleaved runs). With ``max_drop`` and data, the
candidate at the target is finished (reconstructed) and evaluated; if it loses
more than the floor allows, the strongest ratio that meets the floor is found
by a second bisection and saved, and the report says the target was not met.
Channel counts follow ``round_to``, so latency really falls where MACs do.
Per-layer ratios from ``onnxprune sensitivity`` (``--ratios-from``) are kept as given.

``allocation="latency"`` searches one strength too, but spreads it over the
groups by the cost model of :mod:`onnxprune.search.allocation`: groups whose channels
cost more time than their MACs say (the expanded width of inverted residual
blocks, wide classifier inputs) lose more, so latency falls with MACs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from . import allocation as alloc
from ..measure import latency
from ..measure import quality
from ..data import ArrayData
from ..errors import OnnxPruneError
from ..plan import Policy


@dataclass
class Budget:
    macs: float | None = None       # fraction of MACs to keep
    params: float | None = None     # fraction of params to keep
    latency: float | None = None    # fraction of onnxruntime latency to keep
    max_drop: float | None = None   # accuracy points (with labels) or agreement points (without)

    def check(self) -> None:
        for name, v in (("--target-macs", self.macs), ("--target-params", self.params),
                        ("--target-latency", self.latency)):
            if v is not None and (math.isnan(v) or not 0.0 < v <= 1.0):
                raise OnnxPruneError(f"{name} {v}: a fraction to keep, in (0, 1]")
        if self.max_drop is not None and (math.isnan(self.max_drop) or self.max_drop < 0):
            raise OnnxPruneError(f"--max-drop {self.max_drop}: must be 0 or more (points)")

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.macs, self.params, self.latency))


@dataclass
class Outcome:
    policy: Policy
    achieved: dict = field(default_factory=dict)
    met: bool = True
    log: list[dict] = field(default_factory=list)
    message: str = ""

    allocation: str = "uniform"

    def to_json(self) -> dict:
        return {"ratio": self.policy.ratio, "allocation": self.allocation, "achieved": self.achieved,
                "met": self.met, "message": self.message, "steps": self.log}


ALLOCATIONS = ("uniform", "latency")


class Strength:
    """The policy for one searched strength: the uniform ratio itself, or latency-aware per-group ratios."""

    def __init__(self, pruner, policy: Policy, allocation: str = "uniform"):
        if allocation not in ALLOCATIONS:
            raise OnnxPruneError(f"--allocation '{allocation}': expected one of {', '.join(ALLOCATIONS)}")
        if allocation == "latency" and policy.global_ranking:
            raise OnnxPruneError("--allocation latency sets per-group ratios; it cannot be combined with --global")
        self.policy, self.allocation = policy, allocation
        self.cap = 0.95 if not policy.global_ranking else min(0.95, policy.max_ratio)
        self.top, self.weights, self.labels = self.cap, {}, {}
        if allocation == "latency":
            groups = [g for g in pruner.analysis.prunable if g.id in pruner.scores]
            self.cap = min(0.9, policy.max_ratio)
            self.weights = alloc.weights(pruner.analysis, pruner.before, groups)
            self.labels = {g.id: g.label for g in groups}
            self.top = alloc.top_strength(self.weights, self.cap)

    def at(self, strength: float) -> Policy:
        if not self.weights:
            return replace(self.policy, ratio=min(strength, self.cap))
        ratio_for = dict(self.policy.ratio_for)       # the user's own ratios win
        for gid, r in alloc.ratios(strength, self.weights, self.cap).items():
            ratio_for.setdefault(self.labels[gid], r)
        return replace(self.policy, ratio=min(strength, self.cap), ratio_for=ratio_for)


def _fractions(pruner, policy: Policy, budget: Budget, runs: int) -> dict:
    plan = pruner.plan(policy)
    result, stats = pruner.candidate(plan)
    before = pruner.before
    out = {"macs": stats.macs / max(before.macs, 1), "params": stats.params / max(before.params, 1)}
    if budget.latency is not None:
        b = latency.benchmark({"after": result.proto, "before": pruner.original.proto}, warmup=3, runs=runs,
                              input_shapes=pruner.analysis.input_shapes)
        out["latency"] = b.ratio_p50
    return out


def _meets(fr: dict, budget: Budget) -> bool:
    return all(fr[k] <= getattr(budget, k) + 1e-9 for k in ("macs", "params", "latency")
               if getattr(budget, k) is not None)


def search(pruner, policy: Policy, budget: Budget, data: ArrayData | None = None, *, steps: int = 12,
           latency_runs: int = 15, reconstruct: str = "auto", progress=None,
           allocation: str = "uniform") -> tuple[Outcome, object]:
    """Find the weakest strength that meets ``budget``; returns the outcome and the finished PruneResult."""
    budget.check()
    if not budget.active:
        raise OnnxPruneError("no target given: use --target-macs, --target-params or --target-latency")
    if budget.max_drop is not None and data is None:
        raise OnnxPruneError("--max-drop needs --data DATA (labelled for accuracy, or any for fidelity)")
    at = Strength(pruner, policy, allocation)
    outcome = Outcome(policy, allocation=allocation)
    lo, hi = 0.0, at.top
    fr_hi = _fractions(pruner, at.at(hi), budget, latency_runs)
    outcome.log.append({"ratio": hi, **fr_hi})
    if not _meets(fr_hi, budget):  # even the strongest ratio misses: nothing worth saving
        k = next(k for k in ("macs", "params", "latency") if getattr(budget, k) is not None
                 and fr_hi[k] > getattr(budget, k) + 1e-9)
        raise OnnxPruneError(f"--target-{k} {getattr(budget, k):g} cannot be met: removing {at.cap:.0%} of every "
                             f"prunable group still keeps {fr_hi[k]:.3f} of the {k} (frozen groups keep the rest); "
                             f"ask for {math.ceil(fr_hi[k] * 100) / 100:.2f} or more")
    else:
        it = range(steps) if progress is None else progress(range(steps), steps, "searching the budget")
        for _ in it:
            mid = (lo + hi) / 2
            fr = _fractions(pruner, at.at(mid), budget, latency_runs)
            outcome.log.append({"ratio": mid, **fr})
            if _meets(fr, budget):
                hi = mid
            else:
                lo = mid
    ratio = hi if outcome.met else lo
    chosen = at.at(ratio)
    result = pruner.finish(pruner.plan(chosen), reconstruct=reconstruct)
    if budget.max_drop is not None:
        chosen, result = _within_floor(pruner, at, ratio, result, budget.max_drop, data, outcome,
                                       steps=max(4, steps // 2), reconstruct=reconstruct)
    outcome.policy = chosen
    outcome.achieved.update({"ratio": chosen.ratio,
                             "macs": result.after.macs / max(result.before.macs, 1),
                             "params": result.after.params / max(result.before.params, 1)})
    if budget.latency is not None:
        b = latency.benchmark({"after": result.proto, "before": pruner.original.proto}, warmup=3,
                              runs=latency_runs * 2, input_shapes=pruner.analysis.input_shapes)
        outcome.achieved["latency"] = b.ratio_p50
    return outcome, result


def _within_floor(pruner, at: Strength, ratio: float, result, max_drop: float, data: ArrayData,
                  outcome: Outcome, *, steps: int, reconstruct: str):
    """Keep ``result`` if it loses at most ``max_drop`` points, else bisect for the strongest strength that does."""
    original = pruner.original.proto
    base, kind = quality.points(original, original, data)
    q, _ = quality.points(result.proto, original, data)
    outcome.achieved.update({"quality_kind": kind, "quality_before": base})
    chosen = at.at(ratio)
    if base - q > max_drop:
        outcome.met = False
        good, good_result = 0.0, None
        lo, hi = 0.0, ratio
        for _ in range(steps):
            mid = (lo + hi) / 2
            cand = pruner.finish(pruner.plan(at.at(mid)), reconstruct=reconstruct)
            qm, _ = quality.points(cand.proto, original, data)
            outcome.log.append({"ratio": mid, "quality": qm})
            if base - qm <= max_drop:
                good, good_result, lo = mid, cand, mid
            else:
                hi = mid
        outcome.message = (f"the accuracy floor (max drop {max_drop} points) makes the target "
                           f"impossible: saved the strongest model that meets it (ratio {good:.3f})")
        chosen = at.at(good)
        result = good_result or pruner.finish(pruner.plan(chosen), reconstruct=reconstruct)
        q, _ = quality.points(result.proto, original, data)
    outcome.achieved["quality_after"] = q
    return chosen, result
