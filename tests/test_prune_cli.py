"""onnxprune prune from the command line: outputs, report keys, and one-line errors for bad input."""

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder

REPORT_KEYS = {"params_before", "params_after", "macs_before", "macs_after", "groups_pruned", "groups_frozen",
               "verified", "groups"}


@pytest.fixture
def model_path(tmp_path):
    g = GraphBuilder("x", [1, 3, 12, 12], dynamic_batch=True)
    y = g.relu(g.bn(g.conv("x", 16)))
    y = g.relu(g.add(y, g.conv(y, 16)))
    y = g.relu(g.conv(y, 32, stride=2))
    g.output(g.gemm(g.flatten(g.gap(y)), 10))
    p = tmp_path / "m.onnx"
    onnx.save(g.build(), p)
    return p


def test_prune_writes_model_and_report(cli, tmp_path, model_path):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    before = model_path.read_bytes()
    res = cli("prune", model_path, "-o", out, "--ratio", "0.5", "--round-to", "1", "--report", rep, check=0)
    assert "verified" in res.out
    report = json.loads(rep.read_text())
    assert REPORT_KEYS <= report.keys()
    assert report["verified"] is True and report["groups_pruned"] == 2
    assert report["params_after"] < 0.5 * report["params_before"]
    for g in report["groups"]:
        for t in g["tensors"]:
            assert {"tensor", "axis", "removed"} <= t.keys() and len(t["removed"]) > 0
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert model_path.read_bytes() == before


def test_dry_run_and_plan_replay(cli, tmp_path, model_path):
    plan = tmp_path / "plan.json"
    cli("prune", model_path, "-o", tmp_path / "never.onnx", "--dry-run", "--save-plan", plan, check=0)
    assert not (tmp_path / "never.onnx").exists()
    data = json.loads(plan.read_text())
    assert sum(len(g["removed"]) for g in data["groups"]) > 0
    cli("prune", model_path, "-o", tmp_path / "a.onnx", "--plan", plan, check=0)
    cli("prune", model_path, "-o", tmp_path / "b.onnx", check=0)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_validation_rows_with_labelled_data(cli, tmp_path, model_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal([16, 3, 12, 12]).astype(np.float32),
             labels=rng.integers(0, 10, 16))
    rep = tmp_path / "r.json"
    cli("prune", model_path, "-o", tmp_path / "o.onnx", "--calib", data, "--data", data, "--bench-runs", "3",
        "--report", rep, check=0)
    v = json.loads(rep.read_text())["validation"]
    assert 0.0 <= v["accuracy_after"]["top1"] <= 1.0 and v["latency_ms_after"] > 0
    assert json.loads(rep.read_text())["reconstruct_mode"] == "ls"


def test_reconstruct_stages_reaches_the_refit(cli, tmp_path, model_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal([16, 3, 12, 12]).astype(np.float32))
    got = {}
    for stages in (None, 1):
        rep = tmp_path / f"r{stages}.json"
        extra = () if stages is None else ("--reconstruct-stages", str(stages))
        cli("prune", model_path, "-o", tmp_path / f"o{stages}.onnx", "--calib", data, "--round-to", "1",
            "--report", rep, *extra, check=0)
        got[stages] = json.loads(rep.read_text())["reconstruction"]["stages"]
    assert got[1] == 1 and got[None] > 1


@pytest.mark.parametrize("args, words", [
    (["--ratio", "1.0"], "ratio"),
    (["--ratio", "-0.1"], "ratio"),
    (["--ratio", "nan"], "ratio"),
    (["--criterion", "bogus"], "criterion"),
    (["--criterion", "wanda"], "calib"),
    (["--input-shape", "nope=1x3"], "input"),
    (["--calib", "missing.npz"], "missing.npz"),
    (["--reconstruct", "ls"], "calib"),
    (["--reconstruct-stages", "0"], "stages"),
    (["--allocation", "latency"], "--target"),
    (["--round-to", "0"], "round-to"),
    (["--max-drop", "1"], "--target"),
])
def test_bad_arguments_exit_2_with_one_line(cli, tmp_path, model_path, args, words):
    res = cli("prune", model_path, "-o", tmp_path / "o.onnx", *args)
    assert res.code == 2, res
    assert len(res.err.strip().splitlines()) == 1 and "Traceback" not in res.err
    assert words in res.err
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(cli, model_path):
    before = model_path.read_bytes()
    res = cli("prune", model_path, "-o", model_path)
    assert res.code == 2 and "input" in res.err
    assert model_path.read_bytes() == before


def test_bad_calibration_arrays(cli, tmp_path, model_path):
    data = tmp_path / "bad.npz"
    np.savez(data, x=np.zeros([4, 3, 5, 5], np.float32))
    res = cli("prune", model_path, "-o", tmp_path / "o.onnx", "--calib", data)
    assert res.code == 2 and "shape" in res.err
