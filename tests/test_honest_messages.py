"""What the prune command says about what it did: the removal really applied against the ratio asked (rounding
included), plans that remove nothing, and what 'verified' does and does not mean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from builders import GraphBuilder


def test_rounding_is_shown_per_group_and_groups_left_whole_are_listed(cli, fmnist_model, tmp_path):
    res = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--round-to", "32", "--report", tmp_path / "r.json",
              check=0)
    rep = json.loads((tmp_path / "r.json").read_text())
    removal = rep["removal"]
    assert removal["round_to"] == 32 and removal["asked_ratio"] == 0.3
    by_id = {g["group"]: g for g in rep["groups"]}
    total = sum(g["size"] for g in removal["groups"])
    assert abs(removal["removed_ratio"] - sum(len(by_id[g["group"]]["removed_channels"]) if g["group"] in by_id
                                              else 0 for g in removal["groups"]) / total) < 1e-12
    for g in removal["groups"]:
        removed = len(by_id[g["group"]]["removed_channels"]) if g["group"] in by_id else 0
        assert g["removed_ratio"] == removed / g["size"] and g["asked_ratio"] == 0.3
        assert (g["size"] - removed) % 32 == 0   # what rounding did, group by group
    whole = [w["label"] for w in removal["left_whole"]]
    assert whole and all(g["removed_ratio"] == 0 for g in removal["groups"] if g["label"] in whole)
    assert f"left whole: {len(whole)} group(s)" in res.out and whole[0] in res.out
    assert "asked 30%" in res.out and "0% to 50% per group" in res.out


def test_the_cli_default_rounding_says_it_differs_from_the_api(cli, fmnist_model, tmp_path):
    res = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", check=0)
    assert "the Python API keeps exact ratios unless told" in res.out


def test_a_plan_that_removes_nothing_is_an_error(cli, fmnist_model, tmp_path):
    (tmp_path / "sens.json").write_text(json.dumps({"suggested_ratios": {}}))
    res = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--ratio", "0", check=2)
    assert "the plan removes nothing" in res.err and len(res.err.splitlines()) == 1
    (tmp_path / "zeros.json").write_text('{"groups": [], "notes": []}')
    res = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--plan", tmp_path / "zeros.json", check=2)
    assert "removes nothing" in res.err
    assert not (tmp_path / "p.onnx").exists()


def test_without_data_accuracy_is_said_to_be_unmeasured(cli, fmnist_model, tmp_path):
    res = cli("prune", fmnist_model, "-o", tmp_path / "p.onnx", "--round-to", "1", check=0)
    assert "verified: equals the masked original" in res.out
    assert "of the tolerance applied there" in res.out
    assert "not measured (no --data)" in res.err and "--calib DATA" in res.err
    data = Path(fmnist_model).parent / "fmnist_test.npz"
    small = tmp_path / "small.npz"
    with np.load(data) as z:
        np.savez(small, **{k: z[k][:64] for k in z.files})
    res = cli("prune", fmnist_model, "-o", tmp_path / "q.onnx", "--round-to", "1", "--data", small,
              "--bench-runs", "0", check=0)
    assert "not measured" not in res.err and "top-1 accuracy" in res.out


def test_an_output_that_hardly_varies_is_flagged(cli, tmp_path):
    """A sigmoid saturated at 0 on the verification inputs: equality there proves little, and the CLI says so."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 16))
    y = g.relu(g.conv(y, 16))
    logits = g.gemm(g.flatten(g.gap(y)), 4)
    prob = g.op("Sigmoid", [logits])
    g.shapes[prob] = [1, 4]
    g.output(prob)
    m = g.build()
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    bias = next(t for t in m.graph.initializer if t.name == gemm.input[2])
    bias.CopyFrom(onnx.numpy_helper.from_array(np.full(4, -200.0, np.float32), bias.name))
    onnx.save(m, tmp_path / "sat.onnx")
    res = cli("prune", tmp_path / "sat.onnx", "-o", tmp_path / "p.onnx", "--round-to", "1", check=0)
    assert f"'{prob}' hardly varied on the verification inputs" in res.err


# ---------------------------------------------------------------- the command line's small promises

def test_version_and_help_without_markup(cli):
    res = cli("--version", check=0)
    assert res.out.startswith("onnxprune 0.1.0 (onnx ")
    for command in ("prune", "eval", "sparsify", "share", "finetune", "inspect", "bench", "sensitivity"):
        text = cli(command, "--help", check=0).out
        assert "``" not in text and ":class:" not in text and ":func:" not in text, command
    prune_help = " ".join(cli("prune", "--help", check=0).out.split())
    assert "importance criterion: l1, l2, lamp, fpgm" in prune_help and "wanda" in prune_help


def test_dry_run_needs_no_output(cli, fmnist_model, tmp_path):
    res = cli("prune", fmnist_model, "--dry-run", "--save-plan", tmp_path / "plan.json", check=0)
    assert json.loads((tmp_path / "plan.json").read_text())["groups"]
    res = cli("prune", fmnist_model, check=2)
    assert "-o OUT is required" in res.err


def test_long_steps_log_progress_when_not_on_a_terminal(fmnist_model, tmp_path):
    import os
    import subprocess
    import sys
    data = Path(fmnist_model).parent / "fmnist_test.npz"
    env = {k: v for k, v in os.environ.items() if k != "ONNXPRUNE_NO_PROGRESS"}
    env["ONNXPRUNE_PROGRESS_EVERY"] = "0"   # a line per batch instead of every 30 s
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "eval", str(fmnist_model), "--data", str(data),
                           "--batch-size", "4000"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc
    lines = [x for x in proc.stderr.splitlines() if x.startswith("evaluating")]
    assert lines == [f"evaluating (batches): {i} of 3 done, {x.split(', ')[1]}" for i, x in enumerate(lines, 1)]
    assert len(lines) == 3


def test_sparsify_says_what_was_lost_and_the_repair(cli, fmnist_model, tmp_path):
    data = Path(fmnist_model).parent / "fmnist_test.npz"
    small = tmp_path / "small.npz"
    with np.load(data) as z:
        np.savez(small, **{k: z[k][:500] for k in z.files})
    res = cli("sparsify", fmnist_model, "-o", tmp_path / "s.onnx", "--sparsity", "0.9", "--data", small, check=0)
    note = [x for x in res.err.splitlines() if "the zeros cost" in x]
    assert len(note) == 1 and "points of top-1 accuracy" in note[0] and "--criterion sparsegpt" in note[0]


def test_the_python_api_takes_arrays_and_speaks_python(fmnist_model):
    import pytest

    import onnxprune
    with np.load(Path(fmnist_model).parent / "fmnist_calib.npz") as z:
        x = z["input"][:64]
    r = onnxprune.prune(fmnist_model, policy=onnxprune.Policy(ratio=0.3), criterion="wanda", calib={"input": x})
    assert r.verification.passed and r.report()["reconstruct_mode"] == "ls"
    r2 = onnxprune.prune(fmnist_model, policy=onnxprune.Policy(ratio=0.3), criterion="wanda", calib=x)
    assert r2.report()["params_after"] == r.report()["params_after"]
    with pytest.raises(onnxprune.OnnxPruneError) as e:
        onnxprune.prune(fmnist_model, criterion="wanda")
    assert "--" not in str(e.value) and "calib=" in str(e.value)
    with pytest.raises(onnxprune.OnnxPruneError) as e:
        onnxprune.prune(fmnist_model, policy=onnxprune.Policy(round_to=0))
    assert str(e.value).startswith("round_to=0")
    bad = x.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(onnxprune.OnnxPruneError, match="NaN or infinite"):
        onnxprune.prune(fmnist_model, criterion="wanda", calib={"input": bad})


def test_license_matches_pyproject():
    root = Path(__file__).resolve().parents[1]
    assert "Apache License" in (root / "LICENSE").read_text()[:200]
    text = (root / "pyproject.toml").read_text()
    assert 'license = "Apache-2.0"' in text and "torch==" not in text
