"""latency.benchmark and ``onnxprune bench`` on small real graphs (no timing assertions)."""

import json
import math
import os

import numpy as np
import pytest
from builders import GraphBuilder

from onnxprune import ir
from onnxprune.measure import latency
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError


def cnn(channels=8, *, name="x", batch=None, size=12):
    g = GraphBuilder(name, [batch or 1, 3, size, size], dynamic_batch=batch is None)
    y = g.relu(g.conv(name, channels))
    g.output(g.gemm(g.flatten(g.gap(y)), 5))
    return g.build()


def assert_sane(stats: latency.LatencyStats, runs: int):
    values = [stats.p50, stats.p90, stats.mean, stats.min]
    assert all(math.isfinite(v) and v > 0 for v in values)
    assert math.isfinite(stats.std) and stats.std >= 0
    assert stats.min <= stats.p50 <= stats.p90
    assert stats.runs == runs


@pytest.mark.parametrize("interleave", [True, False])
def test_two_models_give_stats_and_a_ratio(interleave):
    result = latency.benchmark({"small": cnn(4), "big": cnn(16)}, warmup=2, runs=7, interleave=interleave)
    assert list(result) == ["small", "big"]
    for s in result.values():
        assert_sane(s, 7)
        assert s.provider == "CPUExecutionProvider" and s.batch_size == 1
        assert s.threads == (os.cpu_count() or 1)
    assert result.ratio_p50 == result["small"].p50 / result["big"].p50
    j = result.to_json()
    assert list(j) == ["models", "ratio_p50", "threads", "provider", "batch_size"]
    assert list(j["models"]["big"]) == ["p50_ms", "p90_ms", "mean_ms", "min_ms", "std_ms", "runs"]


def test_one_model_has_no_ratio_and_records_threads_and_batch():
    result = latency.benchmark({"m": cnn()}, warmup=0, runs=3, threads=1, batch_size=3)
    assert_sane(result["m"], 3)
    assert (result["m"].threads, result["m"].batch_size) == (1, 3)
    assert result.ratio_p50 is None and result.to_json()["ratio_p50"] is None


def test_feeds_from_data_and_from_a_dict():
    x = np.random.default_rng(0).standard_normal((5, 3, 12, 12)).astype(np.float32)
    from_data = latency.benchmark({"m": cnn()}, ArrayData({"x": x}), warmup=0, runs=2, batch_size=4)
    from_dict = latency.benchmark({"m": cnn()}, {"x": x[:2]}, warmup=0, runs=2, batch_size=4)
    assert from_data["m"].batch_size == 4 and from_dict["m"].batch_size == 2


@pytest.mark.parametrize("kwargs, words", [
    ({"runs": 0}, "--runs 0"),
    ({"warmup": -1}, "--warmup -1"),
    ({"batch_size": -2}, "--batch-size -2"),
    ({"threads": 0}, "--threads 0"),
])
def test_bad_settings(kwargs, words):
    with pytest.raises(OnnxPruneError, match=words):
        latency.benchmark({"m": cnn()}, **kwargs)


def test_fixed_batch_and_other_inputs_are_refused():
    with pytest.raises(OnnxPruneError, match="fixed batch of 1"):
        latency.benchmark({"m": cnn(batch=1)}, batch_size=2, runs=1)
    with pytest.raises(OnnxPruneError, match="takes inputs"):
        latency.benchmark({"m": cnn(), "r": cnn(name="image")}, runs=1)


# ------------------------------------------------------------------ CLI


@pytest.fixture
def files(tmp_path):
    paths = {"model": tmp_path / "model.onnx", "ref": tmp_path / "ref.onnx", "other": tmp_path / "other.onnx"}
    ir.save(cnn(4), paths["model"])
    ir.save(cnn(8), paths["ref"])
    ir.save(cnn(8, size=10), paths["other"])
    return paths


def test_cli_bench_json(cli, files, tmp_path):
    out = tmp_path / "bench.json"
    res = cli("bench", files["model"], "--reference", files["ref"], "--runs", 5, "--warmup", 1, "--threads", 1,
              "--batch-size", 2, "--json", out, check=0)
    assert "p50 ratio" in res.out
    j = json.loads(out.read_text())
    assert list(j["models"]) == [str(files["model"]), str(files["ref"])]
    assert all(m["runs"] == 5 and m["p50_ms"] > 0 for m in j["models"].values())
    a, b = (m["p50_ms"] for m in j["models"].values())
    assert j["ratio_p50"] == pytest.approx(a / b)
    assert (j["threads"], j["batch_size"], j["provider"]) == (1, 2, "CPUExecutionProvider")


@pytest.mark.parametrize("args, words", [
    (["{model}", "--runs", "0"], "--runs 0"),
    (["{model}", "--batch-size", "-1"], "--batch-size -1"),
    (["{model}", "--reference", "missing.onnx"], "no such file"),
    (["{model}", "--reference", "{other}"], "input 'x'"),
])
def test_cli_bench_bad_input(cli, files, args, words):
    res = cli("bench", *[a.format(**files) for a in args], check=2)
    assert len(res.err.strip().splitlines()) == 1 and words in res.err, res
