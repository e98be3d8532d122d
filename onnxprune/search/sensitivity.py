"""Sensitivity analysis: prune each group alone at several ratios and measure what it costs.

The scores and the analysis are computed once; each (group, ratio) candidate is
a real rewritten model evaluated in onnxruntime (accuracy with labels, else
agreement with the original). The result suggests, per group, the largest ratio
whose drop stays within a threshold: feed it back with
``onnxprune prune --ratios-from sensitivity.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..measure import quality
from ..data import ArrayData
from ..plan import Plan


@dataclass
class Sensitivity:
    metric: str
    baseline: float
    ratios: list[float]
    groups: list[dict] = field(default_factory=list)
    threshold: float = 1.0

    def suggested(self) -> dict[str, float]:
        """Per group label: the largest tried ratio whose drop is within the threshold (0 if none)."""
        out = {}
        for g in self.groups:
            ok = [r for r, d in zip(self.ratios, g["drops"]) if d <= self.threshold]
            out[g["label"]] = max(ok) if ok else 0.0
        return out

    def to_json(self) -> dict:
        return {"metric": self.metric, "baseline": self.baseline, "ratios": self.ratios,
                "threshold": self.threshold, "groups": self.groups, "suggested_ratios": self.suggested()}


def analyze_sensitivity(pruner, data: ArrayData, ratios: list[float], *, threshold: float = 1.0,
                        limit: int | None = 512, progress=None) -> Sensitivity:
    """Prune every prunable group alone at each ratio; record the drop in points."""
    original = pruner.original.proto
    baseline, metric = quality.points(original, original, data, limit)
    groups = [g for g in pruner.analysis.prunable if g.id in pruner.scores]
    before = pruner.before
    jobs = [(g, r) for g in groups for r in ratios]
    it = jobs if progress is None else progress(jobs, len(jobs), "sensitivity")
    rows: dict[int, dict] = {}
    for g, r in it:
        k = int(np.floor(g.size * r + 1e-9))
        row = rows.setdefault(g.id, {"group": g.id, "label": g.label, "size": g.size, "drops": [],
                                     "macs_saved": []})
        if k == 0 or k >= g.size:
            row["drops"].append(0.0 if k == 0 else float("inf"))
            row["macs_saved"].append(0.0)
            continue
        order = np.argsort(pruner.scores[g.id], kind="stable")
        plan = Plan({g.id: np.sort(order[:k])})
        result, stats = pruner.candidate(plan)
        q, _ = quality.points(result.proto, original, data, limit)
        row["drops"].append(round(baseline - q, 4))
        row["macs_saved"].append(round(1.0 - stats.macs / max(before.macs, 1), 5))
    return Sensitivity(metric, baseline, list(ratios), list(rows.values()), threshold)

