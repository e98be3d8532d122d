"""The verification stage alone: the masked reference zeroes exactly the removed positions, and
``verify`` passes a correct pruned model, fails a wrong one (naming the outputs and tensors that
differ, by how much, against which tolerance) and returns a result object that says so."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from engine_util import outputs
from onnx import numpy_helper

from onnxprune import analyze, rewrite, verify
from onnxprune.data import random_feed
from onnxprune.errors import OnnxPruneError

REMOVED = np.array([0, 2])


@pytest.fixture(scope="module")
def pruned():
    """A conv-relu-conv chain, its analysis, and the rewrite that removes channels 0 and 2."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    g.output(g.conv(g.relu(g.conv("x", 6)), 4, k=1))
    model = g.build()
    an = analyze(model)
    res = rewrite.apply(an, {an.groups[0].id: REMOVED}, model)
    feeds = [random_feed(model, an.input_shapes, seed=s) for s in (1, 2)]
    return model, an, res, feeds


def _scaled(model: onnx.ModelProto, name: str, factor: float) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    init = next(t for t in out.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), name))
    return out


def test_masked_reference_zeroes_exactly_the_removed_positions(pruned):
    model, an, res, feeds = pruned
    conv = model.graph.node[0].output[0]
    ref = verify.masked_reference(model, res.removed_positions, an.shapes)
    for name in (conv, f"{conv}__masked"):   # the conv's own output, and its masked copy that consumers read
        ref.graph.output.add().name = name
    got = outputs(ref, feeds[0])
    masked, plain = got[f"{conv}__masked"], got[conv]
    assert np.all(masked[:, REMOVED] == 0) and np.abs(plain[:, REMOVED]).max() > 0
    np.testing.assert_array_equal(masked[:, [1, 3, 4, 5]], plain[:, [1, 3, 4, 5]])


def test_a_correct_rewrite_passes_with_outputs_and_taps_compared(pruned):
    model, an, res, feeds = pruned
    ver = verify.verify(model, res.proto, res.removed_positions, an.shapes, feeds)
    assert ver and ver.passed and ver.batches == 2 and ver.error == ""
    assert {o.name for o in ver.outputs} == {model.graph.output[0].name} | set(res.removed_positions)
    assert all(o.max_abs <= o.tolerance == pytest.approx(1e-5 + 1e-4 * o.scale) for o in ver.outputs)
    assert ver.needed_rtol < 1e-6
    assert set(ver.to_json()) >= {"passed", "batches", "rtol", "atol", "error", "outputs"}


def test_a_wrong_weight_fails_and_says_where_and_by_how_much(pruned):
    model, an, res, feeds = pruned
    last_bias = model.graph.node[-1].input[2]
    bad = _scaled(res.proto, last_bias, 1.5)
    ver = verify.verify(model, bad, res.removed_positions, an.shapes, feeds)
    assert not ver and not ver.passed
    failed = {o.name for o in ver.outputs if not o.passed}
    assert failed == {model.graph.output[0].name}            # the taps before the last layer still agree
    worst = max(ver.outputs, key=lambda o: o.max_abs)
    assert worst.max_abs > worst.tolerance and ver.needed_rtol > 1e-3


def test_a_wrong_removal_claim_fails_on_the_tapped_tensors(pruned):
    model, an, res, feeds = pruned
    claimed = {k: (axis, np.array([1, 3])) for k, (axis, _) in res.removed_positions.items()}
    ver = verify.verify(model, res.proto, claimed, an.shapes, feeds)
    assert not ver.passed
    assert {o.name for o in ver.outputs if not o.passed} >= set(res.removed_positions)


def test_an_original_that_cannot_run_on_the_feeds_is_a_user_error(pruned):
    model, an, res, _ = pruned
    wrong_rank = [{"x": np.zeros([1, 3, 8], np.float32)}]
    with pytest.raises(OnnxPruneError):
        verify.verify(model, res.proto, res.removed_positions, an.shapes, wrong_rank)
