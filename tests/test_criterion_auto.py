"""--criterion auto: candidates scored in one pass, judged on held-out calibration data after a proxy
reconstruction; the one closest to the original is kept and the trial is in the report."""

import numpy as np
import pytest

from conftest import MODELS
from onnxprune import pipeline
from onnxprune.data.readers import ArrayData
from onnxprune.errors import OnnxPruneError
from onnxprune.plan import Policy


@pytest.fixture(scope="module")
def data():
    with np.load(MODELS / "fmnist_calib.npz") as z:
        return ArrayData({"input": z["input"][:96]})


def test_auto_keeps_the_candidate_closest_to_the_original(fmnist_model, data):
    res = pipeline.prune(fmnist_model, policy=Policy(ratio=0.3), criterion="auto", calib=data)
    t = res.extra["criterion_trial"]
    errs = {c["criterion"]: c["rel_error"] for c in t["candidates"]}
    assert set(errs) == {"l2", "wanda", "fluctuation", "obs"}
    assert res.criterion == t["chosen"] == min(errs, key=errs.get)
    assert t["fit_samples"] == 72 and t["held_out_samples"] == 24 and t["judged_on"] == 24
    # the saved plan is the chosen criterion's: pruning with it by name removes the same channels
    named = pipeline.prune(fmnist_model, policy=Policy(ratio=0.3), criterion=t["chosen"],
                           calib=data.split(72)[0], reconstruct="none")
    assert {g: r.tolist() for g, r in named.plan.removed.items()} == {g: r.tolist()
                                                                     for g, r in res.plan.removed.items()}
    # the trial's figure is a real measurement: the chosen plan, reconstructed, is no farther than l2's
    assert errs[t["chosen"]] <= errs["l2"]


def test_auto_needs_real_data(fmnist_model):
    with pytest.raises(OnnxPruneError, match="real calibration data"):
        pipeline.prune(fmnist_model, policy=Policy(ratio=0.3), criterion="auto", calib="random")


def test_gram_refit_solves_the_normal_equations(fmnist_model, data):
    """The refit from Gram matrices alone is the least-squares fit of the original layer's output on the
    kept inputs: its residual is orthogonal to every kept input column and to the constant."""
    from onnxprune import rewrite
    from onnxprune.importance import ScoreContext, score_groups
    from onnxprune.plan import make_plan
    from onnxprune import ir
    from onnxprune.reconstruct import gram, layers
    from onnxprune.runtime import run, session, with_outputs

    p = pipeline.Pruner(fmnist_model, criterion="l2")
    ctx = ScoreContext(p.original.proto, p.analysis, data=data, gram_rows=None)
    score_groups(p.analysis.prunable, ctx, "obs")                  # gathers every consumer layer's Gram
    grams = {k: (g.gram, g.sums, g.rows) for k, g in ctx.stats().grams.items()}
    res = rewrite.apply(p.analysis, make_plan(p.analysis, p.scores, Policy(ratio=0.5)).removed, p.original)
    assert "/fc/Gemm" in res.kept_inputs
    refit, done = gram.refit(p.original.proto, res.proto, res.kept_inputs, grams, res.kept_outputs, ridge=0.0)
    assert done["/fc/Gemm"] == "refit"
    x_name = "/flatten/Flatten_output_0"
    feed = {"input": data.arrays["input"]}
    x = run(session(with_outputs(p.original.proto, [x_name])), feed, [x_name])[x_name].astype(np.float64)
    y = run(session(p.original.proto), feed, ["logits"])["logits"].astype(np.float64)
    xk = np.hstack([x[:, np.sort(res.kept_inputs["/fc/Gemm"])], np.ones((len(x), 1))])

    def fc(proto):    # the layer's (W | b) as it acts on the ORIGINAL model's kept inputs
        node = next(n for n in ir.to_graph(proto).nodes if n.name == "/fc/Gemm")
        lin, _ = layers.linear(node)
        return np.hstack([lin.W[0], lin.b[:, None]])

    resid = y - xk @ fc(refit).T
    assert np.abs(xk.T @ resid).max() < 1e-6 * np.abs(xk.T @ y).max()
    assert np.linalg.norm(resid) < 0.9 * np.linalg.norm(y - xk @ fc(res.proto).T)
