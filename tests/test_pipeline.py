"""The pipeline stage alone: ``prune`` wires load, analysis, scoring, plan, rewrite and verification
into one verified result; a ``Pruner`` makes many plans from one analysis; a plan replays; ``save``
writes what was verified; the report formats come from the one result object."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from engine_util import outputs

import onnxprune
from onnxprune import pipeline, report
from onnxprune.errors import OnnxPruneError

STAGES = {"load", "analyze", "score", "plan", "rewrite", "verify", "measure"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    y = g.relu(g.conv(y, 8))
    g.output(g.gemm(g.flatten(g.gap(y)), 5))
    path = tmp_path_factory.mktemp("pipeline") / "m.onnx"
    onnx.save(g.build(), path)
    return path


def test_prune_gives_a_verified_result_with_exact_counts(model_path):
    before = model_path.read_bytes()
    result = onnxprune.prune(model_path, policy=onnxprune.Policy(ratio=0.5, round_to=None))
    assert model_path.read_bytes() == before
    assert result.verification.passed
    # conv 3->8 (3x3), conv 8->8 (3x3), gemm 8->5, with biases; half of both hidden widths removed
    assert result.before.params == (8 * 3 * 9 + 8) + (8 * 8 * 9 + 8) + (5 * 8 + 5)
    assert result.after.params == (4 * 3 * 9 + 4) + (4 * 4 * 9 + 4) + (5 * 4 + 5)
    assert [len(g["removed_channels"]) for g in result.rewrite.groups] == [4, 4]
    assert STAGES <= set(result.seconds)
    rep = result.report()
    assert rep["verified"] is True and rep["groups_found"] == 3 and rep["groups_pruned"] == 2
    assert rep["groups_frozen"] == 1 and rep["params_after"] == result.after.params


def test_one_pruner_makes_many_plans_from_one_analysis(model_path):
    pruner = pipeline.Pruner(model_path)
    analysis = pruner.analysis
    removed = {}
    for ratio in (0.25, 0.5, 0.75):
        plan = pruner.plan(onnxprune.Policy(ratio=ratio, round_to=None))
        removed[ratio] = sorted(len(r) for r in plan.removed.values() if len(r))
        assert pruner.analysis is analysis
    assert removed == {0.25: [2, 2], 0.5: [4, 4], 0.75: [6, 6]}
    result = pruner.finish(pruner.plan(onnxprune.Policy(ratio=0.25, round_to=None)))
    assert result.verification.passed and result.after.params < result.before.params


def test_a_saved_plan_replays_to_the_same_model(model_path):
    first = onnxprune.prune(model_path, policy=onnxprune.Policy(ratio=0.5, round_to=None))
    again = onnxprune.prune(model_path, plan=first.plan.to_json(first.analysis))
    assert again.verification.passed
    assert [t.SerializeToString() for t in again.proto.graph.initializer] == \
        [t.SerializeToString() for t in first.proto.graph.initializer]


def test_save_writes_what_was_verified_and_never_the_input(model_path, tmp_path):
    result = onnxprune.prune(model_path, policy=onnxprune.Policy(ratio=0.5, round_to=None))
    out = tmp_path / "pruned.onnx"
    size = onnxprune.save(result, out)
    assert size == out.stat().st_size
    x = {"x": np.random.default_rng(3).standard_normal([1, 3, 8, 8]).astype(np.float32)}
    saved, held = outputs(onnx.load(out), x), outputs(result.proto, x)
    assert all(np.array_equal(saved[k], held[k]) for k in held)
    with pytest.raises(OnnxPruneError, match="input model"):
        onnxprune.save(result, model_path)


def test_json_and_markdown_reports_come_from_the_same_result(model_path, tmp_path):
    result = onnxprune.prune(model_path, policy=onnxprune.Policy(ratio=0.5, round_to=None))
    rep = result.report()
    text, _ = report.markdown(result)
    assert f"| params | {rep['params_before']:,} | {rep['params_after']:,} |" in text
    assert f"groups: {rep['groups_found']} found, {rep['groups_pruned']} pruned, {rep['groups_frozen']} frozen" \
        in text
    for g in rep["groups"]:
        assert f"| {g['group']} | `{g['label']}` | {g['size']} | {len(g['removed_channels'])} |" in text


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(OnnxPruneError, match="no such file"):
        onnxprune.prune(tmp_path / "missing.onnx")
