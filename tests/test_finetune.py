"""Fine-tuning in onnxruntime: the combined loss against finite differences, training a damaged model back."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

from onnxprune.train import finetune as ft
from onnxprune import runtime
from onnxprune.measure import quality
from onnxprune.train.autodiff import build_gradient_model
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError

DIM, CLASSES = 8, 3
MEANS = np.random.default_rng(99).standard_normal((CLASSES, DIM)) * 1.5


def blobs(n: int, seed: int, labels: bool = True) -> ArrayData:
    """A separable task: Gaussian clusters around fixed class means."""
    r = np.random.default_rng(seed)
    y = r.integers(0, CLASSES, n)
    x = (MEANS[y] + r.standard_normal((n, DIM))).astype(np.float32)
    return ArrayData({"x": x}, y.astype(np.int64) if labels else None)


def classifier(noise: float = 0.0) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Gemm: the nearest-mean classifier (h = [Mx, -Mx]); ``noise`` damages it."""
    r = np.random.default_rng(5)
    w1 = np.concatenate([MEANS, -MEANS]).T
    w2 = np.concatenate([np.eye(CLASSES), -np.eye(CLASSES)])
    b2 = -0.5 * (MEANS * MEANS).sum(axis=1)
    w1 = w1 + noise * r.standard_normal(w1.shape) * np.abs(w1).mean()
    w2 = w2 + noise * r.standard_normal(w2.shape)
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in
             (("w1", w1), ("b1", np.zeros(2 * CLASSES)), ("w2", w2), ("b2", b2))]
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"])]
    graph = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", DIM])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def quick(**kw) -> ft.FinetuneConfig:
    return ft.FinetuneConfig(**{"steps": 80, "lr": 0.02, "batch_size": 32, "eval_every": 20, **kw})


# ---------------------------------------------------------------- the combined loss
def _distill_numpy(y, teacher, labels, alpha, t):
    def log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = log_softmax(teacher / t), log_softmax(y / t)
    kl = (np.exp(lp) * (lp - lq)).sum() / len(y) * t * t
    ce = -log_softmax(y)[np.arange(len(y)), labels].sum() / len(y)
    return alpha * kl + (1 - alpha) * ce


def test_distill_loss_value_and_gradient_match_numpy_and_finite_differences():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 5))
    x, teacher = rng.standard_normal((6, 4)), rng.standard_normal((6, 5)) * 2
    labels, alpha, t = rng.integers(0, 5, 6), 0.3, 2.5
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [6, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [6, 5])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    gm = build_gradient_model(model, ["w"], loss="distill", temperature=t, trainable_as_inputs=True)
    roles = ft._roles(gm)
    sess = runtime.session(gm.proto)

    def run(wv):
        feed = {"x": x, "w": wv, roles["teacher"]: teacher, roles["labels"]: labels,
                roles["alpha"]: np.asarray(alpha, np.float64)}
        return sess.run([gm.loss_name, gm.grad_names["w"]], feed)

    loss, grad = run(w)
    assert loss == pytest.approx(_distill_numpy(x @ w, teacher, labels, alpha, t), rel=1e-10)
    eps, fd = 1e-6, np.zeros_like(w)
    for i in np.ndindex(*w.shape):
        d = np.zeros_like(w)
        d[i] = eps
        fd[i] = (run(w + d)[0] - run(w - d)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- what is trained
def test_trainable_weights_exclude_statistics_scalars_and_non_float_constants():
    g = GraphBuilder("x", [1, 3, 6, 6], seed=1, dynamic_batch=True)
    h = g.relu(g.bn(g.conv("x", 4, k=3)))
    h = g.mul(h, g.const(np.float32(0.5)))                 # a scalar: not a weight
    g.output(g.gemm(g.flatten(g.gap(h)), 2))
    m = g.build()
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    want = {conv.input[1], conv.input[2], bn.input[1], bn.input[2], gemm.input[1], gemm.input[2]}
    assert set(ft.trainable(m)) == want                    # not BN mean/var, not the scalar


# ---------------------------------------------------------------- training
def test_finetune_raises_held_out_accuracy_of_a_damaged_model():
    good, damaged = classifier(), classifier(noise=1.5)
    train, test = blobs(600, 1), blobs(2000, 2)
    before = quality.accuracy(damaged, test)["top1"]
    assert quality.accuracy(good, test)["top1"] > 0.95 and before < 0.75
    run = ft.finetune(damaged, train, teacher=good, config=quick())
    assert run.loss == "distill" and run.metric == "top1" and run.holdout_samples == 60
    assert run.best > run.before + 0.15
    assert quality.accuracy(run.proto, test)["top1"] > before + 0.2
    old = {t.name: (t.data_type, list(t.dims)) for t in damaged.graph.initializer}
    assert {t.name: (t.data_type, list(t.dims)) for t in run.proto.graph.initializer} == old
    assert [h["step"] for h in run.history] == [0, 20, 40, 60, 80]
    onnx.checker.check_model(run.proto, full_check=True)


def test_without_labels_it_distils_the_teacher():
    good, damaged = classifier(), classifier(noise=1.5)
    run = ft.finetune(damaged, blobs(600, 1, labels=False), teacher=good, config=quick(optimizer="sgd", lr=0.05))
    assert run.loss == "kl" and run.metric == "agreement"
    test = blobs(1000, 3, labels=False)
    agree = next(iter(quality.fidelity(run.proto, good, test).values()))["top1_agreement"]
    before = next(iter(quality.fidelity(damaged, good, test).values()))["top1_agreement"]
    assert agree > before + 0.2


def test_the_best_checkpoint_is_kept_when_training_makes_things_worse():
    good = classifier()
    run = ft.finetune(good, blobs(300, 1), config=quick(lr=3.0, schedule="constant", steps=40))
    assert run.loss == "cross_entropy" and run.best_step == 0 and min(h["top1"] for h in run.history) < run.best
    same = {t.name: numpy_helper.to_array(t) for t in good.graph.initializer}
    for t in run.proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), same[t.name])


def test_a_regression_output_is_matched_with_mse():
    g = GraphBuilder("x", [1, 2, 6, 6], seed=2, dynamic_batch=True)
    g.output(g.conv(g.relu(g.conv("x", 4, k=3)), 3, k=3))
    teacher = g.build()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for t in student.graph.initializer:
        a = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array((a * 0.6).astype(a.dtype), t.name))
    data = ArrayData({"x": np.random.default_rng(0).standard_normal((200, 2, 6, 6)).astype(np.float32)})
    run = ft.finetune(student, data, teacher=teacher, config=quick(lr=0.01))
    assert run.loss == "mse" and run.metric == "rel_error" and run.best < 0.5 * run.before


def test_bad_settings_are_user_errors():
    with pytest.raises(OnnxPruneError, match="labels"):
        ft.finetune(classifier(), blobs(50, 1, labels=False), config=quick())
    with pytest.raises(OnnxPruneError, match="--alpha"):
        ft.finetune(classifier(), blobs(50, 1), config=quick(alpha=2.0))
    with pytest.raises(OnnxPruneError, match="too few"):
        ft.finetune(classifier(), blobs(1, 1), config=quick())


# ---------------------------------------------------------------- command line
def test_finetune_cli_writes_the_best_checkpoint(tmp_path, cli):
    student, teacher, data = tmp_path / "p.onnx", tmp_path / "t.onnx", tmp_path / "d.npz"
    student.write_bytes(classifier(noise=1.5).SerializeToString())
    teacher.write_bytes(classifier().SerializeToString())
    d = blobs(400, 1)
    np.savez(data, x=d.arrays["x"], labels=d.labels)
    before = student.read_bytes()
    cli("finetune", student, "--teacher", teacher, "--data", data, "-o", tmp_path / "out.onnx", "--steps", 60,
        "--lr", 0.02, "--batch", 32, "--eval-every", 20, "--json", tmp_path / "r.json", check=0)
    assert student.read_bytes() == before
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["loss"] == "distill" and rep["best"] > rep["before"] and rep["steps"] == 60
    test = blobs(1000, 2)
    assert quality.accuracy(onnx.load(tmp_path / "out.onnx"), test)["top1"] > \
        quality.accuracy(classifier(noise=1.5), test)["top1"] + 0.2
    bad = cli("finetune", student, "--data", data, "-o", tmp_path / "x.onnx", "--alpha", "1.5")
    assert bad.code == 2 and "--alpha" in bad.err and "Traceback" not in bad.err


def test_prune_runs_the_whole_loop_with_finetune_steps(tmp_path, cli):
    g = GraphBuilder("x", [1, 1, 8, 8], seed=3, dynamic_batch=True)
    h = g.relu(g.conv(g.relu(g.conv("x", 8, k=3)), 8, k=3))
    g.output(g.gemm(g.flatten(g.gap(h)), CLASSES))
    model, path = g.build(), tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 8, 8)).astype(np.float32)
    labels = runtime.session(model).run(None, {"x": x})[0].argmax(axis=1)
    np.savez(tmp_path / "c.npz", x=x, labels=labels)
    cli("prune", path, "-o", tmp_path / "p.onnx", "--ratio", "0.5", "--criterion", "taylor", "--calib",
        tmp_path / "c.npz", "--finetune-steps", 10, "--finetune-eval-every", 5, "--finetune-batch", 16,
        "--report", tmp_path / "r.json", check=0)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["finetune"]["steps"] == 10 and rep["finetune"]["loss"] == "distill"
    assert rep["finetune"]["best"] >= rep["finetune"]["before"] and "finetune" in rep["seconds"]
    bad = cli("prune", path, "-o", tmp_path / "q.onnx", "--finetune-steps", 5)
    assert bad.code == 2 and "--finetune-data" in bad.err


# ---------------------------------------------------------------- only a resolvable gain is kept
def test_the_sign_test_is_exact():
    assert ft.sign_test(10, 10) == 1 / 1024
    assert ft.sign_test(0, 0) == 1.0
    assert abs(ft.sign_test(5, 10) - 638 / 1024) < 1e-15


def test_a_gain_the_held_out_set_cannot_resolve_keeps_the_input():
    """+4 points on 50 held-out samples (3 fixed, 1 broken): chance explains it (p = 0.31), so no gain is claimed."""
    held = blobs(50, 1)
    sel = ft._Selector(classifier(), None, held, 64, best_step=40, best=0.94)
    sel.base_right = np.r_[np.ones(45, bool), np.zeros(5, bool)]
    sel.best_right = sel.base_right.copy()
    sel.best_right[45:48] = True
    sel.best_right[0] = False
    keep, why = sel.decide()
    assert not keep and "no resolvable gain" in why and "3 fixed, 1 broken" in why and "p = 0.31" in why
    assert "only 50 held-out samples" in why
    sel.best_right[:] = True   # 5 fixed, 0 broken: p = 1/32 < 0.05
    keep, why = sel.decide()
    assert keep and "kept the checkpoint of step 40" in why


def test_a_real_gain_is_kept_and_a_noisy_one_is_not():
    damaged = classifier(noise=1.5)
    run = ft.finetune(damaged, blobs(600, 1), config=quick(holdout=0.5))
    assert not run.kept_input and run.best > run.before and "kept the checkpoint" in run.decision
    nearly = classifier(noise=0.02)  # already at the task's ceiling: any 'gain' is noise
    run = ft.finetune(nearly, blobs(120, 2), config=quick(lr=0.002, holdout=0.25))
    assert run.kept_input and run.best == run.before and run.best_step == 0
    same = {t.name: numpy_helper.to_array(t) for t in nearly.graph.initializer}
    for t in run.proto.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), same[t.name])
