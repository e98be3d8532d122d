"""The second runner: OpenVINO runs the pruned side of verification on every rule-test graph, and
--runtime openvino reaches prune, eval and bench. Skipped only where OpenVINO is not installed."""

import importlib
import inspect
import json

import numpy as np
import pytest

from onnxprune import runtime
from onnxprune.errors import VerificationError

pytest.importorskip("openvino")

# OpenVINO 2026.4 CPU computes Gather(axis=1, a channel-shuffle permutation) -> Conv wrongly (off by
# tens; the Gather alone, or any other permutation, is right): verification on the target catches it
OV_SHUFFLE = "OpenVINO miscomputes a channel-shuffle Gather feeding a Conv; verification catches it"
RULE_MODULES = ["test_rules_conv", "test_rules_shape", "test_rules_attention", "test_rules_barriers"]


def _cases():
    for name in RULE_MODULES:
        mod = importlib.import_module(name)
        for test, fn in vars(mod).items():
            if test.startswith("test_") and callable(fn) and list(inspect.signature(fn).parameters) == ["tmp_path"]:
                marks = [pytest.mark.xfail(strict=True, raises=(AssertionError, VerificationError), reason=OV_SHUFFLE)] \
                    if "channel_shuffle" in test else []
                yield pytest.param(fn, id=f"{name}.{test}", marks=marks)


@pytest.mark.parametrize("rule_test", list(_cases()))
def test_rule_graphs_verify_in_openvino(rule_test, tmp_path):
    with runtime.use(runtime.Target(runtime="openvino")) as target:
        rule_test(tmp_path)
    opened = {(role, rt) for role, rt, _, _ in target.opened}
    assert ("deployed", "openvino") in opened and ("reference", "onnxruntime") in opened, target.opened


def test_openvino_matches_onnxruntime(fmnist_model):
    x = np.load(fmnist_model.parent / "fmnist_test.npz")["input"][:16]
    with runtime.use(runtime.Target(runtime="openvino")):
        ov = runtime.session(str(fmnist_model), role="deployed")
    ort = runtime.session(str(fmnist_model))
    assert ov.runtime == "openvino" and ov.describe() == "openvino CPU (f32)"
    assert [p.name for p in ov.inputs] == [p.name for p in ort.inputs]
    a, b = ov.run(["logits"], {"input": x})[0], ort.run(["logits"], {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert (a.argmax(1) == b.argmax(1)).all()


def test_cli_runtime_openvino(cli, tmp_path, fmnist_model):
    out, rep, ev, be = (tmp_path / n for n in ("p.onnx", "r.json", "e.json", "b.json"))
    data = fmnist_model.parent / "fmnist_test.npz"
    cli("prune", fmnist_model, "-o", out, "--ratio", "0.3", "--report", rep, "--runtime", "openvino",
        "--data", data, "--bench-runs", "3", check=0)
    report = json.loads(rep.read_text())
    assert report["verification"]["checked_by"] == {"pruned": "onnxruntime CPUExecutionProvider",
                                                    "reference": "onnxruntime CPUExecutionProvider",
                                                    "deployed": "openvino CPU (f32)"}
    assert any(o["name"] == "logits [openvino CPU (f32)]" and o["passed"] for o in report["verification"]["outputs"])
    assert report["runtime"]["runtime"] == "openvino"
    assert {(s["role"], s["runtime"]) for s in report["runtime"]["sessions"]} >= {("deployed", "openvino"),
                                                                                   ("reference", "onnxruntime")}
    cli("eval", fmnist_model, "--data", data, "--reference", out, "--runtime", "openvino", "--json", ev, check=0)
    assert json.loads(ev.read_text())["accuracy"]["top1"] > 0.85
    res = cli("bench", out, "--reference", fmnist_model, "--runtime", "openvino", "--runs", "3", "--json", be,
              check=0)
    assert "openvino CPU" in res.out and json.loads(be.read_text())["runtime"]["runtime"] == "openvino"


def test_a_model_the_target_miscomputes_is_refused_with_the_reason(tmp_path):
    """The pruned shuffle net is right in onnxruntime but not in OpenVINO: prune says which, never saves it."""
    import onnx
    from test_rules_shape import shuffle_net

    import onnxprune
    from onnxprune.errors import VerificationError

    path = tmp_path / "shuffle.onnx"
    onnx.save(shuffle_net(), path)
    with runtime.use(runtime.Target(runtime="openvino")):
        with pytest.raises(VerificationError, match="matches its masked original in onnxruntime on the CPU .* "
                                                    "but not in openvino CPU"):
            onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.5))
    assert onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.5)).verification.passed


def test_target_latency_is_measured_in_the_chosen_runtime(cli, tmp_path):
    """--target-latency times candidates where --runtime says (the counts, not the times, are asserted)."""
    import onnx
    from builders import GraphBuilder

    g = GraphBuilder("x", [1, 3, 48, 48], dynamic_batch=True)   # compute, not overhead: removable latency
    y = g.relu(g.conv(g.relu(g.conv(g.relu(g.conv("x", 64)), 64)), 64))
    g.output(g.gemm(g.flatten(g.gap(y)), 10))
    p, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save(g.build(), p)
    cli("prune", p, "-o", tmp_path / "o.onnx", "--target-latency", "0.95", "--round-to", "1", "--runtime", "openvino",
        "--report", rep, check=0)
    sessions = json.loads(rep.read_text())["runtime"]["sessions"]
    timed = sum(s["count"] for s in sessions if s["role"] == "deployed" and s["runtime"] == "openvino")
    assert timed >= 4, sessions   # the original and at least one candidate, in OpenVINO
