"""``--criterion auto``: try a few criteria on the model in front of you and keep the one that holds best.

No criterion wins everywhere: on PP-OCRv4's recognizer ``obs`` keeps the character accuracy
where ``wanda`` loses points, on its detector the reverse (docs/real_accuracy.md). So with real
calibration data the default is a small trial:

1. the calibration data is split as reconstruction splits it: the first ``1 - HOLDOUT`` part is
   fitted on, the rest is held out. Every candidate is scored on the fit part, all in ONE pass
   (``importance.score_candidates``), which also gathers the Gram matrix of every consumer
   layer's input;
2. at the plan's policy (the ratio a budget search found), each candidate's plan is rewritten and
   refit from those Gram matrices (``reconstruct.gram``: the one-stage least-squares
   reconstruction without its passes), then run on at most ``HELD`` held-out samples and compared
   with the original (computed once);
3. the candidate with the smallest relative output error is kept; its plan is the one finished, with
   the full reconstruction that follows. The trial (per candidate: held-out error, agreement when
   the output is a class score, seconds) goes to the report as ``criterion_trial``.

Candidates whose plans remove the same channels share one evaluation.
"""

from __future__ import annotations

import time

from .. import rewrite, runtime
from ..data.readers import ArrayData
from ..measure import quality
from ..plan import Plan, Policy, make_plan

CANDIDATES = ("l2", "wanda", "fluctuation", "obs")
HOLDOUT = 0.25     # as reconstruct()'s default: the trial never sees what the final safety check holds out
HELD = 64          # held-out samples each candidate is judged on


def fit_samples(data: ArrayData, holdout: float = HOLDOUT) -> int:
    """How many leading samples are fitted on (scored, refit); the rest is held out."""
    n = data.num_samples
    held = min(max(int(round(n * holdout)), 1), n - 1) if n > 1 else 0
    return n - held


class Trial:
    """Scores of every candidate on the fit part; ``choose`` runs the held-out comparison once."""

    def __init__(self, pruner, candidates=CANDIDATES, reduction: str = "mean"):
        from ..importance import ScoreContext, score_candidates
        from ..importance.second_order import plan_gram

        self.candidates = list(candidates)
        self.data: ArrayData = pruner.data
        self.fit = fit_samples(self.data)
        self.ctx = ScoreContext(pruner.original.proto, pruner.analysis, data=self.data, progress=pruner.progress,
                                limit=self.fit)
        for g in pruner.analysis.prunable:          # the refit proxy reads every consumer layer's Gram
            needs = plan_gram(g, self.ctx)
            if needs:
                self.ctx.require(needs)
        self.scores, self.fallbacks, secs = score_candidates(pruner.analysis.prunable, self.ctx, self.candidates,
                                                             reduction)
        self.score_seconds = {k: round(v, 2) for k, v in secs.items()}
        self.chosen: str | None = None
        self.report: dict = {}

    def _grams(self) -> dict:
        return {k: (g.gram, g.sums, g.rows) for k, g in self.ctx.stats().grams.items() if g.sums is not None}

    def choose(self, pruner, policy: Policy) -> tuple[str, Plan]:
        """Evaluate every candidate's plan at ``policy`` on held-out data; the winner and its plan."""
        from ..reconstruct import gram

        start = time.perf_counter()
        held = self.data.split(self.fit)[1]
        held = held.split(min(HELD, held.num_samples))[0]
        original = pruner.original.proto
        out = original.graph.output[0].name
        ref_sess = runtime.session(original)
        batches = list(held.batches(32))
        refs = [runtime.run(ref_sess, b, [out])[out] for b in batches]
        grams = self._grams()
        rows, seen = [], {}
        for name in self.candidates:
            t = time.perf_counter()
            plan = make_plan(pruner.analysis, self.scores[name], policy)
            key = tuple((gid, r.tobytes()) for gid, r in sorted(plan.removed.items()))
            row = {"criterion": name, "score_seconds": self.score_seconds.get(name)}
            if key in seen:
                row.update({k: seen[key][k] for k in ("rel_error", "top1_agreement", "refit_layers")},
                           same_plan_as=seen[key]["criterion"], trial_seconds=0.0)
                rows.append(row)
                continue
            res = rewrite.apply(pruner.analysis, plan.removed, pruner.original)
            proto, done = gram.refit(original, res.proto, res.kept_inputs, grams, res.kept_outputs)
            sess = runtime.session(proto)
            agree = quality.Agreement(out)
            for b, r in zip(batches, refs):
                agree.update(runtime.run(sess, b, [out])[out], r)
            got = agree.result()
            row.update(rel_error=got["rel_error"], top1_agreement=got["top1_agreement"],
                       refit_layers=sum(v == "refit" for v in done.values()),
                       trial_seconds=round(time.perf_counter() - t, 2))
            seen[key] = row
            rows.append(row)
        best = min(rows, key=lambda r: r["rel_error"])
        self.chosen = best["criterion"]
        self.report = {"candidates": rows, "chosen": self.chosen, "fit_samples": self.fit,
                       "held_out_samples": self.data.num_samples - self.fit, "judged_on": held.num_samples,
                       "proxy": "least-squares refit from the scoring pass's Gram matrices (no pass), "
                                "relative error of the first output on held-out samples",
                       "score_pass_seconds": self.score_seconds.get("pass"),
                       "seconds": round(time.perf_counter() - start, 2)}
        return self.chosen, make_plan(pruner.analysis, self.scores[self.chosen], policy)
