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
