"""The runtime seam: one runner interface, every session gets the chosen providers and options,
and no module outside onnxprune/runtime imports a runtime."""

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from deploy_util import small_cnn

import onnxprune
from onnxprune import runtime
from onnxprune.errors import OnnxPruneError

PACKAGE = Path(onnxprune.__file__).parent
RUNTIMES = {"onnxruntime", "openvino"}


def test_no_module_outside_runtime_imports_a_runtime():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.is_relative_to(PACKAGE / "runtime"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(PACKAGE)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in RUNTIMES]
    assert offenders == []
    # the scan sees what it looks for: the runtime package itself imports onnxruntime
    assert "import onnxruntime" in (PACKAGE / "runtime" / "ort.py").read_text()


@pytest.fixture
def small(tmp_path):
    p = small_cnn(tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, labels=rng.integers(0, 10, 64))
    return p, tmp_path / "d.npz"


def _sessions(report: dict) -> list[dict]:
    return report["runtime"]["sessions"]


def test_provider_and_session_options_reach_every_session(cli, tmp_path, small):
    """calibration, scoring, reconstruction, verification, fine-tuning, eval and bench all open their
    sessions with the listed provider and options, as read back from the sessions themselves."""
    model, data = small
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    cli("prune", model, "-o", out, "--ratio", "0.5", "--round-to", "1", "--criterion", "taylor",
        "--calib", data, "--data", data, "--bench-runs", "2", "--finetune-steps", "2", "--report", rep,
        "--provider", "CPUExecutionProvider", "--session-option", "intra_op_num_threads=1",
        "--session-option", "graph_optimization_level=basic", check=0)
    report = json.loads(rep.read_text())
    assert report["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert report["runtime"]["session_options"] == {"intra_op_num_threads": "1", "graph_optimization_level": "basic"}
    sessions = _sessions(report)
    assert {s["role"] for s in sessions} == {"compute", "deployed", "reference"}
    assert all(s["providers"] == ["CPUExecutionProvider"] and s["options"]["intra_op_num_threads"] == "1"
               for s in sessions), sessions
    levels = {s["options"]["graph_optimization_level"] for s in sessions}
    # the user's level wherever a caller did not need graph optimisations off (taps keep their names)
    assert "ORT_ENABLE_BASIC" in levels and "ORT_ENABLE_ALL" not in levels
    # accuracy and latency, before and after, on the deployed side; the stages' own sessions are compute ones
    assert sum(s["count"] for s in sessions if s["role"] == "deployed") >= 4
    assert sum(s["count"] for s in sessions if s["role"] == "compute") >= 4
    assert report["verification"]["checked_by"] == {"pruned": "onnxruntime CPUExecutionProvider",
                                                    "reference": "onnxruntime CPUExecutionProvider"}
    assert "finetune" in report and report["reconstruct_mode"] == "ls"


def test_defaults_differ_from_the_options_given(tmp_path, small):
    """Without options, sessions keep onnxruntime's defaults: the test above measures a real change."""
    model, _ = small
    result = onnxprune.prune(model, policy=onnxprune.Policy(ratio=0.5, round_to=None))
    sessions = result.report()["runtime"]["sessions"]
    assert all(s["options"]["intra_op_num_threads"] == "0" for s in sessions)
    result = onnxprune.prune(model, policy=onnxprune.Policy(ratio=0.5, round_to=None),
                             providers=["CPUExecutionProvider"], session_options={"intra_op_num_threads": 2})
    sessions = result.report()["runtime"]["sessions"]
    assert sessions and all(s["options"]["intra_op_num_threads"] == "2" for s in sessions)
    assert runtime.current().options == {}  # the API's settings end with the call


def test_unknown_provider_exits_2_listing_available(cli, tmp_path, small):
    model, _ = small
    res = cli("prune", model, "-o", tmp_path / "o.onnx", "--provider", "NoSuchExecutionProvider", check=2)
    lines = res.err.strip().splitlines()
    assert len(lines) == 1 and "NoSuchExecutionProvider" in lines[0] and "CPUExecutionProvider" in lines[0]
    assert not (tmp_path / "o.onnx").exists()
    res = cli("bench", model, "--session-option", "no_such_option=3", check=2)
    assert len(res.err.strip().splitlines()) == 1 and "no_such_option" in res.err
    res = cli("eval", model, "--data", "random", "--session-option", "intra_op_num_threads=many", check=2)
    assert "expected an integer" in res.err


def test_runner_interface(small):
    model, _ = small
    runner = runtime.session(str(model))
    assert [p.name for p in runner.inputs] == ["x"] and runner.inputs[0].dtype == np.float32
    x = np.ones((2, 3, 12, 12), np.float32)
    (y,) = runner.run(None, {"x": x})
    assert y.shape == (2, 10)
    assert runner.timed_run({"x": x}) > 0
    with pytest.raises(OnnxPruneError, match="available"):
        runtime.Target(providers=["Nope"]).check()
