"""Latency-aware allocation: the cost model on a real inverted residual graph, and the budget search with it."""

import json

import onnx
import pytest
from builders import GraphBuilder

from onnxprune import pipeline
from onnxprune.search import allocation


def inverted_residual_model(path):
    """stem -> 2 inverted residual blocks (1x1 expand 16->96, 3x3 depthwise, 1x1 project 96->16, Add) -> head."""
    g = GraphBuilder("x", [1, 3, 16, 16], dynamic_batch=True, seed=7)
    y = g.relu(g.conv("x", 16))
    for _ in range(2):
        h = g.relu(g.conv(y, 96, k=1))
        h = g.relu(g.conv(h, 96, k=3, group=96))
        y = g.add(y, g.conv(h, 16, k=1))
    g.output(g.gemm(g.flatten(g.gap(y)), 10, bias=False))
    onnx.save(g.build(), path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return inverted_residual_model(tmp_path_factory.mktemp("alloc") / "ir.onnx")


def test_cost_model_on_inverted_residual_blocks(model):
    p = pipeline.Pruner(model)
    groups = [g for g in p.analysis.prunable if g.id in p.scores]
    hidden = [g for g in groups if g.size == 96]
    stream = [g for g in groups if g.size == 16]
    assert len(hidden) == 2 and len(stream) == 1
    layers = {layer.name: layer for layer in p.before.layers}
    macs, elements = allocation.group_cost(hidden[0], p.analysis, layers)
    assert macs == (16 + 9 + 16) * 16 * 16            # expand (16 in) + depthwise 3x3 + project (16 out), per pixel
    assert 4 * 256 <= elements <= 4 * 256 + 60         # expand and depthwise outputs with their ReLUs, + weights
    w = allocation.weights(p.analysis, p.before, groups)
    assert w[hidden[0].id] > 1.0 > w[stream[0].id]   # the expanded width costs more time per MAC
    r = allocation.ratios(0.4, w, cap=0.9)
    assert r[hidden[0].id] == pytest.approx(0.4 * w[hidden[0].id] ** allocation.GAMMA) and r[stream[0].id] < 0.4
    assert allocation.ratios(allocation.top_strength(w, 0.9), w, 0.9) == {k: 0.9 for k in w}


def test_budget_search_with_latency_allocation(cli, tmp_path, model):
    rep = tmp_path / "r.json"
    cli("prune", model, "-o", tmp_path / "o.onnx", "--target-macs", "0.5", "--allocation", "latency",
        "--report", rep, check=0)
    r = json.loads(rep.read_text())
    assert r["budget"]["allocation"] == "latency" and r["budget"]["met"] is True and r["verified"] is True
    assert 0.35 < r["macs_after"] / r["macs_before"] <= 0.5
    removed = {g["size"]: len(g["removed_channels"]) / g["size"] for g in r["groups"]}
    assert removed[96] > removed.get(16, 0.0)          # the hidden width went first


@pytest.mark.parametrize("args", [["--allocation", "latency", "--global", "--target-macs", "0.5"],
                                  ["--allocation", "latency"], ["--allocation", "greedy", "--target-macs", "0.5"]])
def test_bad_allocation_arguments(cli, tmp_path, model, args):
    res = cli("prune", model, "-o", tmp_path / "o.onnx", *args)
    assert res.code == 2 and len(res.err.strip().splitlines()) <= 3, res   # argparse prints usage + error
    assert "allocation" in res.err
