"""``--criterion auto``: try a few criteria on the model in front of you and keep the one that holds best.

No criterion wins everywhere: on PP-OCRv4's recognizer ``obs`` keeps the character accuracy
where ``wanda`` loses points, on its detector the reverse (docs/real_accuracy.md). So with real
calibration data the default is a small trial:

1. the calibration data is split as reconstruction splits it: the first ``1 - holdout`` part is
   fitted on, the rest is held out. Every candidate is scored on the fit part, all in ONE pass
   (``importance.score_candidates``);
2. at the plan's policy (the ratio a budget search found), each candidate's plan is rewritten and
   reconstructed by a cheap proxy of the reconstruction that follows (``ls``, one stage, at most
   ``FIT`` fit samples, ``POSITIONS`` positions per sample), and its output compared with the
   original's on at most ``HELD`` held-out samples;
3. the candidate with the smallest relative output error is kept; its plan is the one finished, with
   the full reconstruction. The trial (per candidate: held-out error, agreement when the output is a
   class score, seconds) goes to the report as ``criterion_trial``.

Candidates whose plans remove the same channels share one evaluation.
"""

from __future__ import annotations

import time

import numpy as np

from .. import rewrite
from ..data.readers import ArrayData
from ..plan import Plan, Policy, make_plan

CANDIDATES = ("l2", "wanda", "fluctuation", "obs")
HOLDOUT = 0.25     # as reconstruct()'s default: the trial never sees what the final safety check holds out
FIT = 32           # fit samples of the proxy reconstruction
HELD = 32          # held-out samples each candidate is judged on
POSITIONS = 32     # output positions per sample and layer in the proxy (the full reconstruction: 64)


def fit_samples(data: ArrayData, holdout: float = HOLDOUT) -> int:
    """How many leading samples are fitted on (scored, reconstructed); the rest is held out."""
    n = data.num_samples
    held = min(max(int(round(n * holdout)), 1), n - 1) if n > 1 else 0
    return n - held


def _subset(data: ArrayData, fit: int, n_fit: int, n_held: int) -> ArrayData:
    """The first ``n_fit`` samples and ``n_held`` held-out samples (from index ``fit``) as one data set."""
    n = data.num_samples
    if n_fit >= fit and fit + n_held >= n:
        return data
    arrays = {k: np.concatenate([np.asarray(v[:n_fit]), np.asarray(v[fit:fit + n_held])])
              for k, v in data.arrays.items()}
    return ArrayData(arrays, None, data.kind, data.source, data.meta)


class Trial:
    """Scores of every candidate on the fit part; ``choose`` runs the held-out comparison once."""

    def __init__(self, pruner, candidates=CANDIDATES, reduction: str = "mean"):
        from ..importance import ScoreContext, score_candidates

        self.candidates = list(candidates)
        self.data: ArrayData = pruner.data
        self.fit = fit_samples(self.data)
        self.ctx = ScoreContext(pruner.original.proto, pruner.analysis, data=self.data, progress=pruner.progress,
                                limit=self.fit)
        self.scores, self.fallbacks, secs = score_candidates(pruner.analysis.prunable, self.ctx, self.candidates,
                                                             reduction)
        self.score_seconds = {k: round(v, 2) for k, v in secs.items()}
        self.chosen: str | None = None
        self.report: dict = {}

    def choose(self, pruner, policy: Policy, progress=None) -> tuple[str, Plan]:
        """Evaluate every candidate's plan at ``policy`` on held-out data; the winner and its plan."""
        from ..reconstruct import reconstruct

        start = time.perf_counter()
        n_held = min(HELD, self.data.num_samples - self.fit)
        sub = _subset(self.data, self.fit, min(FIT, self.fit), n_held)
        holdout = n_held / sub.num_samples
        rows, seen = [], {}
        for name in self.candidates:
            t = time.perf_counter()
            plan = make_plan(pruner.analysis, self.scores[name], policy)
            key = tuple((gid, r.tobytes()) for gid, r in sorted(plan.removed.items()))
            row = {"criterion": name, "score_seconds": self.score_seconds.get(name)}
            if key in seen:
                row.update({k: v for k, v in seen[key].items() if k in ("rel_error", "top1_agreement")},
                           same_plan_as=seen[key]["criterion"], trial_seconds=0.0)
                rows.append(row)
                continue
            res = rewrite.apply(pruner.analysis, plan.removed, pruner.original)
            _, rep = reconstruct(pruner.original.proto, res.proto, res.kept_inputs, sub, mode="ls",
                                 kept_outputs=res.kept_outputs, holdout=holdout, stages=1, positions=POSITIONS,
                                 fidelity_samples=n_held, progress=progress)
            fid = (rep.fidelity or {}).get("reconstructed", {})
            row.update(rel_error=fid.get("rel_error"), top1_agreement=fid.get("top1_agreement"),
                       trial_seconds=round(time.perf_counter() - t, 2))
            seen[key] = row
            rows.append(row)
        best = min((r for r in rows if r.get("rel_error") is not None), key=lambda r: r["rel_error"],
                   default=rows[0])
        self.chosen = best["criterion"]
        self.report = {"candidates": rows, "chosen": self.chosen, "fit_samples": self.fit,
                       "held_out_samples": self.data.num_samples - self.fit,
                       "proxy": {"fit_samples": min(FIT, self.fit), "held_out_samples": n_held, "stages": 1,
                                 "positions": POSITIONS},
                       "score_pass_seconds": self.score_seconds.get("pass"),
                       "seconds": round(time.perf_counter() - start, 2)}
        return self.chosen, make_plan(pruner.analysis, self.scores[self.chosen], policy)
