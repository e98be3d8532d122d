"""Importance criteria: named callables that score the channels of a group (higher = keep).

    ctx = ScoreContext(proto, analysis, data=calib)
    scores = score_groups(analysis.prunable, ctx, "wanda", reduction="mean")   # {group id: [size]}

Weight criteria read only constants; calibration criteria (``requires_data``)
read :class:`CalibrationStats` that ``score_groups`` gathers in one streaming
pass for all groups. See ``docs/criteria.md`` for formulas and sources.
"""

from __future__ import annotations

import numpy as np

from ..errors import OnnxPruneError
from ..groups import Group
from . import activations, gradient, second_order, weights
from .base import REDUCTIONS, Criterion, resolve
from .context import ScoreContext
from .stats import CalibrationStats, Needs

CRITERIA: dict[str, Criterion] = {c.name: c for c in weights.CRITERIA + activations.CRITERIA + second_order.CRITERIA
                                  + gradient.CRITERIA}

__all__ = ["CRITERIA", "CalibrationStats", "Criterion", "Needs", "ScoreContext", "get", "requires_data",
           "score_candidates", "score_groups", "fallback_summary"]


def get(name: str) -> Criterion:
    if name not in CRITERIA:
        raise OnnxPruneError(f"unknown importance criterion '{name}'; choose one of: {', '.join(CRITERIA)}")
    return CRITERIA[name]


def requires_data(name: str) -> bool:
    """Whether ``name`` needs calibration data (``--calib``)."""
    return get(name).requires_data


def score_groups(groups: list[Group], ctx: ScoreContext, criterion: str, reduction: str = "mean"
                 ) -> dict[int, np.ndarray]:
    """Scores of every group's channels, ``{group.id: float64 [group.size]}``, higher = keep.

    All groups' statistics are registered before the first one is scored, so the
    calibration data is streamed once. Groups a criterion cannot measure are scored by
    its fallback; ``ctx.fallbacks`` records which.
    """
    crit = get(criterion)
    if reduction not in REDUCTIONS:
        raise OnnxPruneError(f"--group-reduction '{reduction}': expected one of {', '.join(REDUCTIONS)}")
    chosen = {}
    for g in groups:
        chosen[g.id] = resolve(crit, g, ctx)
        needs = chosen[g.id].plan(g, ctx)
        if needs:
            ctx.require(needs)
    if ctx.pending():
        ctx.stats()                                     # the one calibration pass, before scoring
    it = ctx.progress(groups, len(groups), f"scoring ({criterion})") if ctx.progress else groups
    return {g.id: chosen[g.id](g, ctx, reduction) for g in it}


def fallback_summary(ctx: ScoreContext, criterion: str) -> list[str]:
    """One line per fallback criterion used, e.g. ``apoz -> act-mean on 3 groups (ids 4, 7, 9)``."""
    by: dict[str, list[int]] = {}
    for gid, name in sorted(ctx.fallbacks.items()):
        by.setdefault(name, []).append(gid)
    return [f"{criterion} -> {name} on {len(ids)} group(s) (ids {', '.join(map(str, ids[:10]))}"
            f"{', ...' if len(ids) > 10 else ''})" for name, ids in by.items()]


def score_candidates(groups: list[Group], ctx: ScoreContext, criteria: list[str], reduction: str = "mean"
                     ) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, dict[int, str]], dict[str, float]]:
    """Several criteria's scores from ONE calibration pass: every candidate's statistics are registered
    before the data streams. Returns ``(scores, fallbacks, seconds)`` per criterion name, with
    ``seconds["pass"]`` the shared pass."""
    import time

    chosen: dict[str, dict[int, Criterion]] = {}
    fallbacks: dict[str, dict[int, str]] = {}
    for name in criteria:
        crit = get(name)
        ctx.fallbacks.clear()
        chosen[name] = {}
        for g in groups:
            chosen[name][g.id] = resolve(crit, g, ctx)
            needs = chosen[name][g.id].plan(g, ctx)
            if needs:
                ctx.require(needs)
        fallbacks[name] = dict(ctx.fallbacks)
    ctx.fallbacks.clear()
    seconds = {}
    t = time.perf_counter()
    if ctx.pending():
        ctx.stats()
    seconds["pass"] = time.perf_counter() - t
    scores = {}
    for name in criteria:
        t = time.perf_counter()
        it = ctx.progress(groups, len(groups), f"scoring ({name})") if ctx.progress else groups
        scores[name] = {g.id: chosen[name][g.id](g, ctx, reduction) for g in it}
        seconds[name] = time.perf_counter() - t
    ctx.fallbacks.clear()
    return scores, fallbacks, seconds
