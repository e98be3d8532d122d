"""quality.accuracy / fidelity / evaluate and ``onnxprune eval`` on small real graphs."""

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import ir
from onnxprune.measure import quality
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError

C = 10


def linear(bias=None, *, batch="N", out="logits", spatial=False, input_name="x") -> onnx.ModelProto:
    """logits = x @ I + bias: the predicted class is the argmax of the input (plus bias)."""
    b = np.zeros(C, np.float32) if bias is None else np.asarray(bias, np.float32)
    nodes = [helper.make_node("Gemm", [input_name, "W", "b"], ["g" if spatial else out])]
    if spatial:
        nodes.append(helper.make_node("Reshape", ["g", "shape"], [out]))
    inits = [numpy_helper.from_array(np.eye(C, dtype=np.float32), "W"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([-1, C, 1, 1], np.int64), "shape")]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT,
                                                                              [batch, C])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                             [batch, C, 1, 1] if spatial else [batch, C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def scores_with_ranks(label_ranks, seed=0):
    """Rows that are permutations of 0..C-1 (integer scores) and labels of the given rank (0 = argmax)."""
    rng = np.random.default_rng(seed)
    x = np.stack([rng.permutation(C) for _ in label_ranks]).astype(np.float32)
    labels = np.array([int(np.argsort(-row)[r]) for row, r in zip(x, label_ranks)], np.int64)
    return x, labels


def test_accuracy_of_known_classifier():
    # 6 of 8 labels are the argmax, the other two are 2nd and 5th: top-1 = 0.75, top-5 = 1.0
    x, labels = scores_with_ranks([0, 0, 1, 0, 0, 4, 0, 0])
    acc = quality.accuracy(linear(), ArrayData({"x": x}, labels), batch_size=3)
    assert acc == {"top1": 0.75, "top5": 1.0, "n": 8}
    first4 = quality.accuracy(linear(), ArrayData({"x": x}, labels), batch_size=3, limit=4)
    assert first4 == {"top1": 0.75, "top5": 1.0, "n": 4}


def test_accuracy_top5_misses_and_nchw11_logits():
    x, labels = scores_with_ranks([0, 5, 9, 4])
    acc = quality.accuracy(linear(spatial=True), ArrayData({"x": x}, labels))
    assert acc == {"top1": 0.25, "top5": 0.5, "n": 4}


def test_ties_and_dead_outputs_never_count_as_hits():
    x = np.zeros((4, C), np.float32)
    acc = quality.accuracy(linear(), ArrayData({"x": x}, np.arange(4)))
    assert acc["top1"] == 0.0 and acc["top5"] == 0.0


def test_fixed_batch_pads_the_last_batch():
    x, labels = scores_with_ranks([0, 1, 0, 0, 0, 0, 2])  # 7 samples through a batch-of-4 model
    acc = quality.accuracy(linear(batch=4), ArrayData({"x": x}, labels), batch_size=64)
    assert acc["n"] == 7 and acc["top1"] == pytest.approx(5 / 7)


def test_fidelity_against_itself_is_perfect():
    x, _ = scores_with_ranks(range(C))
    fid = quality.fidelity(linear(), linear(), ArrayData({"x": x}), batch_size=4)
    assert fid == {"logits": {"top1_agreement": 1.0, "cosine": pytest.approx(1.0), "max_abs": 0.0,
                              "mean_abs": 0.0, "rel_error": 0.0}}


def test_fidelity_with_a_known_bias_shift():
    delta = 1.5
    x, _ = scores_with_ranks([0] * 8, seed=3)
    x[:2] = [[8 if j == 3 else (9 if j == 0 else j % 8) for j in range(C)]] * 2  # class 3 is 2nd: flips
    x[2:, 3] = np.minimum(x[2:, 3], 7)  # elsewhere class 3 stays below the top even shifted
    bias = np.zeros(C, np.float32)
    bias[3] = delta
    data = ArrayData({"x": x})
    fid = quality.fidelity(linear(bias, out="y"), linear(), data, batch_size=3)
    shifted = x.astype(np.float64) + bias
    cos = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(shifted, x)])
    assert list(fid) == ["y"]  # names differ: matched by position, keyed by the candidate's name
    f = fid["y"]
    assert f["max_abs"] == delta
    assert f["mean_abs"] == pytest.approx(delta / C)
    assert f["top1_agreement"] == 0.75
    assert f["rel_error"] == pytest.approx(math.sqrt(len(x)) * delta / np.linalg.norm(x))
    assert f["cosine"] == pytest.approx(cos)


def test_reference_with_other_inputs_is_refused():
    x, _ = scores_with_ranks([0, 0])
    with pytest.raises(OnnxPruneError, match="takes inputs"):
        quality.fidelity(linear(), linear(input_name="image"), ArrayData({"x": x}))


def test_accuracy_needs_labels_in_range():
    x, labels = scores_with_ranks([0, 0])
    with pytest.raises(OnnxPruneError, match="no 'labels'"):
        quality.accuracy(linear(), ArrayData({"x": x}))
    with pytest.raises(OnnxPruneError, match="10 classes"):
        quality.accuracy(linear(), ArrayData({"x": x}, np.array([0, C])))


def test_evaluate_combines_accuracy_fidelity_and_size():
    x, labels = scores_with_ranks([0, 0, 0, 3])
    bias = np.zeros(C, np.float32)
    bias[0] = 0.5
    report = quality.evaluate(linear(bias), ArrayData({"x": x}, labels), reference=linear())
    j = report.to_json()
    assert list(j) == ["model", "reference", "samples", "accuracy", "reference_accuracy", "fidelity", "params",
                       "macs", "file_bytes", "reference_params", "reference_macs", "reference_file_bytes",
                       "perplexity", "reference_perplexity"]
    assert j["samples"] == 4
    assert j["accuracy"] == {"top1": 0.75, "top5": 1.0} == j["reference_accuracy"]
    assert j["fidelity"]["logits"]["max_abs"] == 0.5
    assert (j["params"], j["macs"]) == (C * C + C, C * C) == (j["reference_params"], j["reference_macs"])
    assert j["file_bytes"] == linear(bias).ByteSize()
    json.dumps(j)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def files(tmp_path):
    x, labels = scores_with_ranks([0, 0, 1, 0, 0, 4, 0, 0])
    bias = np.zeros(C, np.float32)
    bias[3] = 1.5
    paths = {"model": tmp_path / "model.onnx", "ref": tmp_path / "ref.onnx", "other": tmp_path / "other.onnx",
             "data": tmp_path / "data.npz", "nolabels": tmp_path / "nolabels.npz", "wrong": tmp_path / "wrong.npz"}
    ir.save(linear(bias), paths["model"])
    ir.save(linear(), paths["ref"])
    ir.save(linear(input_name="image"), paths["other"])
    np.savez(paths["data"], x=x, labels=labels)
    np.savez(paths["nolabels"], x=x)
    np.savez(paths["wrong"], x=x[:, :4])
    return paths


def test_cli_eval_json(cli, files, tmp_path):
    out = tmp_path / "eval.json"
    res = cli("eval", files["ref"], "--data", files["data"], "--reference", files["model"], "--batch-size", 3,
              "--json", out, check=0)
    assert "top-1" in res.out and "fidelity" in res.out
    j = json.loads(out.read_text())
    assert j["model"] == str(files["ref"]) and j["reference"] == str(files["model"])
    assert j["samples"] == 8 and j["accuracy"] == {"top1": 0.75, "top5": 1.0}
    assert set(j["fidelity"]["logits"]) == set(quality.FIDELITY_KEYS)
    assert j["fidelity"]["logits"]["max_abs"] == 1.5
    assert j["params"] == j["reference_params"] == 110 and j["file_bytes"] > 0


def test_cli_eval_without_labels_or_reference(cli, files, tmp_path):
    out = tmp_path / "eval.json"
    res = cli("eval", files["model"], "--data", files["nolabels"], "--json", out, check=0)
    assert "cannot be computed" in res.err
    j = json.loads(out.read_text())
    assert j["accuracy"] is None and j["fidelity"] is None and j["reference"] is None and j["params"] == 110


@pytest.mark.parametrize("args, words", [
    (["missing.onnx", "--data", "{data}"], "no such file"),
    (["{model}", "--data", "missing.npz"], "no such data file"),
    (["{model}", "--data", "{wrong}"], "shape"),
    (["{model}", "--data", "{data}", "--reference", "{other}"], "takes inputs"),
    (["{model}", "--data", "{data}", "--batch-size", "0"], "--batch-size"),
])
def test_cli_eval_bad_input(cli, files, args, words):
    res = cli("eval", *[a.format(**files) for a in args], check=2)
    assert len(res.err.strip().splitlines()) == 1 and words in res.err, res
