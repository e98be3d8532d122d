"""``onnxprune inspect`` end to end in a subprocess, on models built here."""

from __future__ import annotations

import json

import onnx
import pytest
from builders import GraphBuilder

from onnxprune.measure import counts


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A small CNN with a symbolic batch plus a token-mixing MatMul between two activations."""
    g = GraphBuilder("image", [1, 3, 16, 16], dynamic_batch=True)
    y = g.relu(g.conv("image", 8, k=3, stride=2))        # 1x8x8x8
    y = g.reshape(y, [-1, 8, 64])                           # tokens: batch x 8 x 64
    y = g.op("MatMul", [y, g.transpose(y, [0, 2, 1])])      # batch x 8 x 8, no weight
    g.output(g.gemm(g.flatten(y), 10), onnx.TensorProto.FLOAT)
    model = g.build()
    model.producer_name, model.producer_version = "builders", "1.0"
    path = tmp_path_factory.mktemp("inspect") / "net.onnx"
    onnx.save(model, path)
    return path


def per_image_macs() -> int:
    conv = 8 * 8 * 8 * 3 * 9
    gram = 8 * 8 * 64
    fc = 10 * 64
    return conv + gram + fc


def test_prints_header_table_and_totals(cli, model_path):
    res = cli("inspect", model_path, check=0)
    lines = res.out.splitlines()
    assert "net.onnx" in lines[0] and "opset 17" in lines[0] and "IR v8" in lines[0]
    assert "producer builders 1.0" in lines[0]
    assert any(line.startswith("input   image: float Nx3x16x16 (analysed as 1x3x16x16)") for line in lines)
    assert any(line.startswith("output  ") and "float" in line for line in lines)
    conv_row = next(line for line in lines if "│ Conv" in line)
    assert "8x3x3x3" in conv_row and "224" in conv_row and f"{8 * 8 * 8 * 3 * 9:,}" in conv_row
    gram_row = next(line for line in lines if "│ MatMul" in line)
    assert "│ -" in gram_row and f"{8 * 8 * 64:,}" in gram_row
    assert f"MACs {per_image_macs():,}" in lines[-1]
    assert f"params {224 + 650:,}" in lines[-1]
    assert f"file {model_path.stat().st_size:,} bytes" in lines[-1]
    assert res.err == ""


def test_json_report_matches_summary_and_scales_with_batch(cli, model_path, tmp_path):
    one, three = tmp_path / "one.json", tmp_path / "three.json"
    cli("inspect", model_path, "--json", one, check=0)
    cli("inspect", model_path, "--input-shape", "image=3x3x16x16", "--json", three, check=0)
    a, b = json.loads(one.read_text()), json.loads(three.read_text())

    for key in ("params", "macs", "file_bytes", "opset", "inputs", "outputs", "layers"):
        assert key in a
    assert a["macs"] == per_image_macs()
    assert b["macs"] == 3 * a["macs"]
    assert a["params"] == b["params"] == 224 + 650
    assert a["file_bytes"] == model_path.stat().st_size
    assert a["opset"] == 17
    assert a["inputs"] == [{"name": "image", "dtype": "float", "shape": ["N", 3, 16, 16],
                            "analysed_shape": [1, 3, 16, 16]}]
    assert b["inputs"][0]["analysed_shape"] == [3, 3, 16, 16]
    assert len(a["outputs"]) == 1

    expected = counts.summarize(onnx.load(model_path), {"image": [3, 3, 16, 16]})
    assert b["layers"] == [vars(layer) for layer in expected.layers]
    assert [layer["op"] for layer in b["layers"]] == ["Conv", "MatMul", "Gemm"]
    assert b["layers"][0]["output_shape"] == [3, 8, 8, 8]
    assert b["layers"][1]["weight"] == "" and b["layers"][1]["params"] == 0
    assert sorted(tmp_path.iterdir()) == sorted([one, three])  # no temp files left


def test_symbolic_spatial_sizes_get_a_hint_on_stderr(cli, tmp_path):
    from test_metrics import symbolic_hw_model

    path = tmp_path / "dyn.onnx"
    onnx.save(symbolic_hw_model(), path)
    plain = cli("inspect", path, check=0)
    assert plain.err.splitlines() == [
        "note: x has symbolic sizes, analysed as 1; pass --input-shape x=?x3x?x? with real sizes for meaningful MACs"]
    assert f"MACs {4 * 27}" in plain.out.splitlines()[-1]
    given = cli("inspect", path, "--input-shape", "x=1x3x32x32", check=0)
    assert given.err == ""
    assert f"MACs {4 * 32 * 32 * 27:,}" in given.out.splitlines()[-1]
