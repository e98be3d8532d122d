"""Budgets and sensitivity, end to end on small real models."""

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder

from onnxprune import runtime
from onnxprune.measure import latency


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    g = GraphBuilder("x", [1, 3, 12, 12], dynamic_batch=True, seed=3)
    y = g.relu(g.conv("x", 32))
    y = g.relu(g.conv(y, 32))
    y = g.relu(g.conv(y, 48, stride=2))
    g.output(g.gemm(g.flatten(g.gap(y)), 10, bias=False))   # no bias: predictions depend on the input
    p = d / "m.onnx"
    onnx.save(g.build(), p)
    rng = np.random.default_rng(0)
    x = rng.standard_normal([64, 3, 12, 12]).astype(np.float32)
    logits = runtime.run(runtime.session(onnx.load(p)), {"x": x})
    data = d / "d.npz"
    np.savez(data, x=x, labels=next(iter(logits.values())).argmax(1))   # the original is 100% right
    return p, data


@pytest.mark.parametrize("flag, key", [("--target-macs", "macs"), ("--target-params", "params")])
def test_target_is_met(cli, tmp_path, model_and_data, flag, key):
    model, _ = model_and_data
    rep = tmp_path / "r.json"
    cli("prune", model, "-o", tmp_path / "o.onnx", flag, "0.5", "--round-to", "1", "--report", rep, check=0)
    r = json.loads(rep.read_text())
    frac = r[f"{key}_after"] / r[f"{key}_before"]
    assert frac <= 0.5 and frac > 0.3          # met, and not far beyond the target
    assert r["budget"]["met"] is True and r["verified"] is True


def test_accuracy_floor_that_makes_the_target_impossible(cli, tmp_path, model_and_data):
    model, data = model_and_data
    rep = tmp_path / "r.json"
    res = cli("prune", model, "-o", tmp_path / "o.onnx", "--target-macs", "0.1", "--max-drop", "0", "--round-to", "1",
              "--data", data, "--reconstruct", "none", "--bench-runs", "0", "--report", rep, check=0)
    r = json.loads(rep.read_text())
    assert r["budget"]["met"] is False and "impossible" in r["budget"]["message"]
    assert "impossible" in res.err
    assert r["budget"]["achieved"]["quality_after"] >= r["budget"]["achieved"]["quality_before"] - 1e-9
    assert r["macs_after"] / r["macs_before"] > 0.1


def test_sensitivity_curves_and_feedback(cli, tmp_path, model_and_data):
    model, data = model_and_data
    out = tmp_path / "s.json"
    res = cli("sensitivity", model, "--data", data, "--ratios", "0.25,0.5,0.75", "--json", out, check=0)
    assert "suggested" in res.out
    s = json.loads(out.read_text())
    assert s["ratios"] == [0.25, 0.5, 0.75] and len(s["groups"]) == 3
    for g in s["groups"]:
        assert len(g["drops"]) == 3 and all(0.0 <= m <= 1.0 for m in g["macs_saved"])
        assert g["macs_saved"] == sorted(g["macs_saved"])
    rep = tmp_path / "r.json"
    cli("prune", model, "-o", tmp_path / "o.onnx", "--ratios-from", out, "--round-to", "1", "--report", rep, check=0)
    pruned = {g["label"]: len(g["removed_channels"]) / g["size"] for g in json.loads(rep.read_text())["groups"]}
    for label, ratio in s["suggested_ratios"].items():
        assert abs(pruned.get(label, 0.0) - ratio) < 0.05


@pytest.mark.parametrize("args", [["--target-macs", "0"], ["--target-macs", "1.5"], ["--target-macs", "nan"],
                                  ["--target-macs", "0.5", "--max-drop", "1"], ["--max-drop", "1"]])
def test_bad_budget_arguments(cli, tmp_path, model_and_data, args):
    model, _ = model_and_data
    res = cli("prune", model, "-o", tmp_path / "o.onnx", *args)
    assert res.code == 2 and len(res.err.strip().splitlines()) == 1, res


@pytest.mark.parametrize("flag, kept", [([], None), (["--round-to", "1"], 39), (["--round-to", "8"], 40)])
def test_round_to_defaults_to_the_simd_block(cli, tmp_path, flag, kept):
    """64 channels at ratio 0.4 keep 39 exactly, 40 at multiples of 8, 32 at multiples of 16 (AVX-512)."""
    g = GraphBuilder("x", [1, 3, 8, 8], seed=1)
    g.output(g.gemm(g.flatten(g.gap(g.relu(g.conv("x", 64)))), 4))
    model = tmp_path / "m.onnx"
    onnx.save(g.build(), model)
    out = tmp_path / "o.onnx"
    cli("prune", model, "-o", out, "--ratio", "0.4", *flag, check=0)
    conv = next(n for n in onnx.load(out).graph.node if n.op_type == "Conv")
    shape = next(t.dims for t in onnx.load(out).graph.initializer if t.name == conv.input[1])
    assert shape[0] == (kept if kept is not None else {16: 32, 8: 40}[latency.simd_block()])
