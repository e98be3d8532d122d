"""Quantization hand-off and the ORT format: real onnxruntime quantizer and converter on small models."""

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from deploy_util import small_cnn

from onnxprune import runtime


@pytest.fixture
def cnn(tmp_path):
    p = small_cnn(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 3, 12, 12)).astype(np.float32)
    labels = runtime.session(str(p)).run(None, {"x": x})[0].argmax(1)  # the float model's own answers
    np.savez(tmp_path / "calib.npz", x=x[:64])
    np.savez(tmp_path / "test.npz", x=x[64:], labels=labels[64:])
    return p


def test_static_int8_with_report_and_ort(cli, tmp_path, cnn):
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    before = cnn.read_bytes()
    cli("quantize", cnn, "-o", out, "--calib", tmp_path / "calib.npz", "--data", tmp_path / "test.npz",
        "--reference", cnn, "--bench-runs", "2", "--ort", "--json", rep, check=0)
    assert cnn.read_bytes() == before
    r = json.loads(rep.read_text())
    q = onnx.load(out)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # per-channel weights: a Conv weight's scale has one entry per output channel
    scales = [onnx.numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("_scale")]
    assert any(s.ndim == 1 and s.size == 16 for s in scales)
    assert r["quantization"]["method"] == "static" and r["quantization"]["per_channel"] is True
    assert r["quantization"]["calib_samples"] == 64
    m = r["measured"]
    assert m["accuracy_float"]["top1"] == 1.0 and m["accuracy"]["top1"] > 0.8 and m["exact"] is False
    assert m["points_vs_original"] == m["points_vs_float"] <= 0
    assert set(m["latency"]["p50_ms"]) == {"int8", "float", "original"}
    assert r["file_bytes_after"] < r["file_bytes_before"]
    ort = r["formats"]["ort"]
    assert ort["loads"] and ort["matches_onnx"] and (tmp_path / "q.ort").stat().st_size == ort["bytes"]
    x = np.load(tmp_path / "test.npz")["x"][:4]
    a = runtime.session(str(tmp_path / "q.ort")).run(None, {"x": x})[0]
    np.testing.assert_allclose(a, runtime.session(str(out)).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def test_dynamic_int8_for_matmul_models(cli, tmp_path):
    g = GraphBuilder("x", [1, 8, 32], dynamic_batch=True)
    y = g.matmul(g.relu(g.matmul("x", 64)), 32)
    g.output(y)
    p, out = tmp_path / "mm.onnx", tmp_path / "mm.int8.onnx"
    onnx.save(g.build(), p)
    cli("quantize", p, "-o", out, "--dynamic", "--json", tmp_path / "r.json", "--bench-runs", "0", check=0)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["quantization"]["method"] == "dynamic"
    assert "MatMulInteger" in {n.op_type for n in onnx.load(out).graph.node}


def test_bad_quantize_input_exits_2(cli, tmp_path, cnn):
    res = cli("quantize", cnn, "-o", tmp_path / "q.onnx", check=2)
    assert "--calib" in res.err and len(res.err.strip().splitlines()) == 1
    res = cli("quantize", cnn, "-o", tmp_path / "q.onnx", "--dynamic", "--calib", tmp_path / "calib.npz", check=2)
    assert len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "q.onnx").exists()


def test_prune_then_quantize_measured_against_the_original(cli, tmp_path, cnn):
    out, rep = tmp_path / "pq.onnx", tmp_path / "pq.json"
    cli("prune", cnn, "-o", out, "--ratio", "0.5", "--round-to", "1", "--calib", tmp_path / "calib.npz",
        "--data", tmp_path / "test.npz", "--bench-runs", "2", "--quantize", "int8", "--report", rep, check=0)
    r = json.loads(rep.read_text())
    q = r["quantization"]
    assert q["method"] == "static" and q["measured"]["accuracy_original"]["top1"] == 1.0
    assert "points_vs_original" in q["measured"] and "points_vs_float" in q["measured"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(out).graph.node}
    assert r["verified"] is True   # the float pruned model was verified exactly before quantization
