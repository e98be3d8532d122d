"""The criterion object: per-member channel scores, normalised per member, reduced over the group.

Every criterion is two small functions over a group:

* ``plan(group, ctx) -> Needs | None`` — the calibration statistics it will read
  (an empty ``Needs`` for weight criteria), or ``None`` when the group has
  nothing this criterion can measure (no ReLU for APoZ, no consumer layer for
  Wanda...). Planning is structural, so every group's needs are known before
  the data is streamed.
* ``members(group, ctx) -> list[array]`` — one ``[group.size]`` score array per
  measured member (higher = keep).

The per-member arrays are normalised (``mean``: divided by their mean, so layers
of different scale weigh the same; ``lamp``; or none) and reduced with
``mean``/``sum``/``max``. A criterion with nothing to measure on a group hands
it to its ``fallback`` and the context records it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import OnnxPruneError
from ..groups import Group
from .context import ScoreContext
from .stats import Needs

Plan = Callable[[Group, ScoreContext], "Needs | None"]
MemberScores = Callable[[Group, ScoreContext], "list[np.ndarray]"]


def normalize_mean(s: np.ndarray) -> np.ndarray:
    m = float(np.mean(s)) if s.size else 0.0
    return s / m if m > 0 and np.isfinite(m) else s


def normalize_lamp(s: np.ndarray) -> np.ndarray:
    """LAMP (Lee et al. 2021): each score over the sum of all scores not smaller than it."""
    order = np.argsort(s, kind="stable")
    tail = np.cumsum(s[order][::-1])[::-1]
    out = np.empty_like(s, dtype=np.float64)
    out[order] = np.divide(s[order], tail, out=np.zeros(len(s)), where=tail > 0)
    return out


def _identity(s: np.ndarray) -> np.ndarray:
    return s


NORMALIZERS = {"mean": normalize_mean, "lamp": normalize_lamp, "none": _identity}
REDUCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda a: a.mean(axis=0),
    "sum": lambda a: a.sum(axis=0),
    "max": lambda a: a.max(axis=0),
}


@dataclass(frozen=True)
class Criterion:
    name: str
    plan: Plan
    members: MemberScores
    requires_data: bool = False
    normalize: str = "mean"
    fallback: str | None = None
    summary: str = ""

    def __call__(self, group: Group, ctx: ScoreContext, reduction: str | None = None) -> np.ndarray:
        """float64 scores of shape ``[group.size]``, higher = keep."""
        crit = resolve(self, group, ctx)
        needs = crit.plan(group, ctx)
        if needs:
            ctx.require(needs)
        per_member = crit.members(group, ctx)
        return combine(per_member, group.size, crit.normalize, reduction or ctx.reduction)


def combine(per_member: list[np.ndarray], size: int, normalize: str, reduction: str) -> np.ndarray:
    if reduction not in REDUCTIONS:
        raise OnnxPruneError(f"group reduction '{reduction}': expected one of {', '.join(REDUCTIONS)}")
    norm = NORMALIZERS[normalize]
    rows = [norm(np.asarray(s, dtype=np.float64)) for s in per_member]
    if not rows:
        return np.zeros(size, dtype=np.float64)
    return REDUCTIONS[reduction](np.stack(rows)).astype(np.float64)


def resolve(crit: Criterion, group: Group, ctx: ScoreContext) -> Criterion:
    """``crit`` or the first fallback that has something to measure on ``group`` (recorded in ctx)."""
    from . import CRITERIA

    if crit.requires_data and ctx.data is None:
        raise OnnxPruneError(f"criterion '{crit.name}' needs calibration data; pass --calib DATA.npz "
                             "(or --calib random), or use a weight criterion such as l2")
    tried = []
    c: Criterion | None = crit
    while c is not None and c.name not in tried:
        if not (c.requires_data and ctx.data is None) and c.plan(group, ctx) is not None:
            if c is not crit:
                ctx.fallbacks[group.id] = c.name
            return c
        tried.append(c.name)
        c = CRITERIA.get(c.fallback) if c.fallback else None
    raise OnnxPruneError(f"group {group.id} ({group.label or 'unnamed'}): nothing to score with "
                         f"{' or '.join(tried)} (no constant weights or activations found for it)")
