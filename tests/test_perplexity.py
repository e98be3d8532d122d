"""Perplexity of causal LMs on token ids: measure.perplexity, ``eval --metric perplexity``, ``prune --data``."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import OnnxPruneError
from onnxprune.measure import perplexity as ppl
from onnxprune.testing import transformer

V, D = 23, 5


def bigram(with_mask=False):
    """logits = E[ids] @ W: computable in numpy, so the test's perplexity is independent of the package."""
    rng = np.random.default_rng(3)
    E = rng.standard_normal((V, D)).astype(np.float32)
    W = (rng.standard_normal((D, V)) * 2).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])]
    if with_mask:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "t"]))
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["logits"])]
    g = helper.make_graph(nodes, "bigram", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                  ["b", "t", V])],
                          [numpy_helper.from_array(E, "E"), numpy_helper.from_array(W, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m, E, W


def numpy_perplexity(E, W, ids, mask):
    logits = (E[ids] @ W).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for i in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            if mask[i, t] and mask[i, t + 1]:
                total -= logp[i, t, ids[i, t + 1]]
                count += 1
    return math.exp(total / count), count


def tokens(n=7, t=9, seed=0, pad=True):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (n, t))
    mask = np.ones((n, t), np.int64)
    if pad:
        mask[1, 6:] = 0     # right padding
        mask[4, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("batch", [1, 3, 100])
def test_perplexity_matches_numpy_with_padding(tmp_path, batch):
    model, E, W = bigram(with_mask=True)
    ids, mask = tokens()
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=mask)
    want, count = numpy_perplexity(E, W, ids, mask)
    got = ppl.perplexity(model, ppl.token_data(tmp_path / "ids.npz", model), batch_size=batch)
    assert got["tokens"] == count == 7 * 8 - 3 - 6
    assert got["sequences"] == 7
    assert got["perplexity"] == pytest.approx(want, rel=1e-5)


def test_model_without_mask_input_and_file_without_mask(tmp_path):
    model, E, W = bigram()
    ids, _ = tokens(pad=False)
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    want, _ = numpy_perplexity(E, W, ids, np.ones_like(ids))
    assert ppl.perplexity(model, ppl.token_data(tmp_path / "ids.npz", model))["perplexity"] == pytest.approx(want, 1e-5)


def test_bad_token_data(tmp_path):
    model, _, _ = bigram()
    np.savez(tmp_path / "f.npz", input_ids=np.zeros((3, 4), np.float32))
    with pytest.raises(OnnxPruneError, match="integer array"):
        ppl.token_data(tmp_path / "f.npz", model)
    np.savez(tmp_path / "big.npz", input_ids=np.full((2, 4), V + 5))
    with pytest.raises(OnnxPruneError, match="cannot run the model on these tokens"):
        ppl.perplexity(model, ppl.token_data(tmp_path / "big.npz", model))


def test_eval_cli_perplexity(cli, tmp_path):
    model, E, W = bigram(with_mask=True)
    onnx.save(model, tmp_path / "m.onnx")
    ids, mask = tokens()
    np.savez(tmp_path / "ids.npz", input_ids=ids, attention_mask=mask)
    want, count = numpy_perplexity(E, W, ids, mask)
    cli("eval", tmp_path / "m.onnx", "--data", tmp_path / "ids.npz", "--metric", "perplexity",
        "--reference", tmp_path / "m.onnx", "--batch-size", "2", "--json", tmp_path / "e.json", check=0)
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["perplexity"]["perplexity"] == pytest.approx(want, rel=1e-5)
    assert rep["perplexity"]["tokens"] == count
    assert rep["reference_perplexity"] == rep["perplexity"]
    # a model without input_ids: one line, exit 2
    img = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])]))
    onnx.save(img, tmp_path / "img.onnx")
    r = cli("eval", tmp_path / "img.onnx", "--data", tmp_path / "ids.npz", "--metric", "perplexity", check=2)
    assert "input_ids" in r.err and len(r.err.strip().splitlines()) == 1


def test_prune_reports_perplexity_before_and_after(cli, tmp_path):
    model = transformer.decoder(norm="layer", positions=True)
    onnx.save(model, tmp_path / "lm.onnx")
    ids = np.random.default_rng(0).integers(0, 96, (6, 12))
    np.savez(tmp_path / "ids.npz", input_ids=ids)
    cli("prune", tmp_path / "lm.onnx", "-o", tmp_path / "small.onnx", "--ratio", "0.25", "--round-to", "1",
        "--data", tmp_path / "ids.npz", "--metric", "perplexity", "--bench-runs", "0",
        "--report", tmp_path / "r.json", check=0)
    v = json.loads((tmp_path / "r.json").read_text())["validation"]
    before = ppl.perplexity(model, ppl.token_data(tmp_path / "ids.npz", model))
    after = ppl.perplexity(onnx.load(tmp_path / "small.onnx"), ppl.token_data(tmp_path / "ids.npz", model))
    assert v["perplexity_before"]["perplexity"] == pytest.approx(before["perplexity"], rel=1e-6)
    assert v["perplexity_after"]["perplexity"] == pytest.approx(after["perplexity"], rel=1e-6)
    assert v["perplexity_after"]["perplexity"] != pytest.approx(before["perplexity"], rel=1e-4)
