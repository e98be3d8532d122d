"""Taylor criteria: known answers on a tiny MLP (numpy gradients), dead and useless channels, targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from builders import GraphBuilder
from onnx import numpy_helper

from onnxprune.analysis import analyze
from onnxprune.train.autodiff import differentiable
from onnxprune.data import ArrayData
from onnxprune.groups import ACTIVATION
from onnxprune.importance import CRITERIA, ScoreContext, score_groups
from onnxprune.importance.gradient import per_position

N_IN, HIDDEN, CLASSES = 5, 6, 3


def mlp(dead: int | None = None, useless: int | None = None, tail: str | None = None):
    """x -> MatMul+b -> Relu -> MatMul+b [-> tail op]; returns the model and its named tensors and weights."""
    g = GraphBuilder("x", [1, N_IN], seed=7, dynamic_batch=True)
    h = g.matmul("x", HIDDEN)
    r = g.relu(h)
    y = g.matmul(r, CLASSES)
    g.output(g.op(tail, [y]) if tail else y)
    m = g.build()
    mm1, add1, mm2, add2 = [n for n in m.graph.node if n.op_type in ("MatMul", "Add")]
    w = {t.name: numpy_helper.to_array(t).copy() for t in m.graph.initializer}
    names = {"w1": mm1.input[1], "b1": add1.input[1], "w2": mm2.input[1], "b2": add2.input[1],
             "m": mm1.output[0], "h": h, "r": r}
    if dead is not None:                       # never fires: zero weights, negative bias
        w[names["w1"]][:, dead], w[names["b1"]][dead] = 0.0, -1.0
    if useless is not None:                    # fires strongly but the next layer ignores it
        w[names["b1"]][useless], w[names["w2"]][useless] = 5.0, 0.0
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(w[t.name].astype(np.float32), t.name))
    return m, names, {k: w[v].astype(np.float64) for k, v in names.items() if v in w}


def data(n=20, labels=True, seed=3) -> ArrayData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, N_IN)).astype(np.float32)
    return ArrayData({"x": x}, rng.integers(0, CLASSES, n).astype(np.int64) if labels else None)


def numpy_grads(w: dict, x: np.ndarray, labels: np.ndarray):
    """Forward values and batch-mean cross-entropy gradients of the MLP, in float64."""
    x = x.astype(np.float64)
    m = x @ w["w1"]
    h = m + w["b1"]
    r = np.maximum(h, 0)
    y = r @ w["w2"] + w["b2"]
    p = np.exp(y - y.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dy = (p - np.eye(CLASSES)[labels]) / len(x)
    dr = dy @ w["w2"].T
    dh = dr * (h > 0)
    return {"m": m, "h": h, "r": r, "y": y, "dh": dh, "dr": dr, "dw1": x.T @ dh, "dw2": r.T @ dy}


def scored(model, d, crit, batch_size=8):
    a = analyze(model)
    (grp,) = a.prunable
    ctx = ScoreContext(model, a, data=d, batch_size=batch_size)
    return grp, ctx, score_groups([grp], ctx, crit)[grp.id]


def member_scores(model, d, crit, batch_size=8):
    grp, ctx, _ = scored(model, d, crit, batch_size)
    return grp, ctx, CRITERIA[crit].members(grp, ctx)


def test_taylor_equals_the_numpy_sum_of_per_sample_activation_times_gradient():
    model, names, w = mlp()
    d = data()
    grp, _, scores = member_scores(model, d, "taylor")
    ref = numpy_grads(w, d.arrays["x"], d.labels)
    n = len(d.labels)
    want = {names["m"]: np.abs(ref["m"] * ref["dh"] * n).sum(axis=0),   # MatMul output: before the bias
            names["h"]: np.abs(ref["h"] * ref["dh"] * n).sum(axis=0),
            names["r"]: np.abs(ref["r"] * ref["dr"] * n).sum(axis=0)}
    acts = grp.of_kind(ACTIVATION)
    assert {m.tensor for m in acts} == set(want)
    for member, got in zip(acts, scores):
        np.testing.assert_allclose(got, want[member.tensor], rtol=1e-4, atol=1e-7, err_msg=member.tensor)
    np.testing.assert_allclose(want[names["h"]], want[names["r"]])      # h·1[h>0] = relu(h)


def test_taylor_does_not_depend_on_the_batch_size():
    model, _, _ = mlp()
    d = data(n=20)
    _, _, a = scored(model, d, "taylor", batch_size=8)
    _, _, b = scored(model, d, "taylor", batch_size=20)
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_taylor_weight_equals_the_numpy_per_batch_sum_of_weight_times_gradient():
    model, names, w = mlp()
    d = data(n=20)
    grp, _, scores = member_scores(model, d, "taylor-weight", batch_size=8)
    want = {names["w1"]: np.zeros(HIDDEN), names["w2"]: np.zeros(HIDDEN)}
    for s in range(0, 20, 8):
        ref = numpy_grads(w, d.arrays["x"][s:s + 8], d.labels[s:s + 8])
        want[names["w1"]] += np.abs(w["w1"] * ref["dw1"]).sum(axis=0)     # output channels: columns of W1
        want[names["w2"]] += np.abs(w["w2"] * ref["dw2"]).sum(axis=1)     # input channels: rows of W2
    members = [m for m in grp.members if m.tensor in want]
    assert len(members) == len(scores) == 2
    for member, got in zip(members, scores):
        np.testing.assert_allclose(got, want[member.tensor], rtol=1e-4, atol=1e-8, err_msg=member.tensor)


@pytest.mark.parametrize("crit", ["taylor", "taylor-weight"])
def test_a_channel_that_never_fires_ranks_last(crit):
    model, _, _ = mlp(dead=2)
    _, _, s = scored(model, data(), crit)
    assert int(np.argmin(s)) == 2 and s[2] == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.delete(s, 2) > 0)


@pytest.mark.parametrize("crit", ["taylor", "taylor-weight"])
def test_a_channel_that_feeds_nothing_that_matters_ranks_last(crit):
    model, _, _ = mlp(useless=3)
    d = data()
    _, _, s = scored(model, d, crit)
    assert int(np.argmin(s)) == 3 and s[3] == pytest.approx(0.0, abs=1e-12)
    _, _, act = scored(model, d, "act-mean")            # its activation is the largest of all
    assert int(np.argmax(act)) == 3


def test_without_labels_the_target_is_the_models_own_top1():
    model, _, w = mlp()
    d = data(labels=False)
    _, _, unlabeled = scored(model, d, "taylor")
    top1 = numpy_grads(w, d.arrays["x"], np.zeros(20, dtype=np.int64))["y"].argmax(axis=1)
    _, _, pseudo = scored(model, ArrayData(d.arrays, top1), "taylor")
    np.testing.assert_allclose(unlabeled, pseudo, rtol=1e-5)


def test_a_non_classification_output_uses_a_random_projection_and_is_reproducible():
    g = GraphBuilder("x", [1, 2, 6, 6], seed=4, dynamic_batch=True)
    h = g.conv("x", 5, k=3)
    g.output(g.conv(g.relu(h), 3, k=3))                         # [N, 3, 6, 6]: no classes
    model = g.build()
    conv2 = [n for n in model.graph.node if n.op_type == "Conv"][1]
    for t in model.graph.initializer:                           # channel 1 feeds nothing
        if t.name == conv2.input[1]:
            w2 = numpy_helper.to_array(t).copy()
            w2[:, 1] = 0.0
            t.CopyFrom(numpy_helper.from_array(w2, t.name))
    d = ArrayData({"x": np.random.default_rng(0).standard_normal((12, 2, 6, 6)).astype(np.float32)})
    _, _, a = scored(model, d, "taylor")
    _, _, b = scored(model, d, "taylor")
    np.testing.assert_array_equal(a, b)
    assert int(np.argmin(a)) == 1 and np.all(np.delete(a, 1) > 0)


def test_per_position_sums_each_sample_before_the_absolute_value():
    rng = np.random.default_rng(1)
    a, g = rng.standard_normal((3, 4, 2, 5)), rng.standard_normal((3, 4, 2, 5))
    want = [sum(abs((a[n, c] * g[n, c]).sum()) for n in range(3)) for c in range(4)]
    np.testing.assert_allclose(per_position(a, g, 1), want)
    want_last = [sum(abs((a[n, :, :, c] * g[n, :, :, c]).sum()) for n in range(3)) for c in range(5)]
    np.testing.assert_allclose(per_position(a, g, 3), want_last)


def test_an_op_without_a_gradient_rule_makes_the_group_fall_back():
    model, names, _ = mlp(tail="Softplus")                      # no reverse-mode rule for Softplus
    assert names["r"] not in differentiable(model)
    grp, ctx, s = scored(model, data(), "taylor")
    assert ctx.fallbacks == {grp.id: "act-mean"} and np.all(np.isfinite(s))
    grp, ctx, _ = scored(model, data(), "taylor-weight")
    assert ctx.fallbacks == {grp.id: "l2"}


def test_taylor_through_the_prune_cli(tmp_path, cli):
    model, _, _ = mlp(dead=4)
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    path.write_bytes(model.SerializeToString())
    d = data(n=32)
    np.savez(calib, x=d.arrays["x"], labels=d.labels)
    cli("prune", path, "-o", tmp_path / "p.onnx", "--criterion", "taylor", "--calib", calib, "--ratio", "0.2",
        "--save-plan", tmp_path / "plan.json", "--reconstruct", "none", check=0)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert [c for g in plan["groups"] for c in g["removed"]] == [4], plan


def test_in_graph_sums_equal_numpy_when_a_relu_input_is_also_read_elsewhere():
    from onnxprune import runtime
    from onnxprune.train.autodiff import build_gradient_model
    from onnxprune.importance.gradient import _with_products

    g = GraphBuilder("x", [4, N_IN], seed=5)
    h = g.matmul("x", HIDDEN)
    r = g.relu(h)
    s = g.op("Add", [h, r])                    # h is read by the Relu and by the Add: x·∂L/∂x != Relu(x)·∂L/∂Relu(x)
    t = g.relu(g.matmul(s, HIDDEN))
    g.output(g.matmul(t, CLASSES))
    model = g.build()
    acts = [(h, 1), (r, 1), (s, 1)]
    gm = build_gradient_model(model, [a for a, _ in acts], loss="cross_entropy")
    feed = {"x": np.random.default_rng(2).standard_normal((4, N_IN)).astype(np.float32),
            next(iter(gm.extra_inputs)): np.array([0, 1, 2, 1])}
    full = runtime.session(runtime.with_outputs(gm.proto, [a for a, _ in acts])).run(
        [a for a, _ in acts] + [gm.grad_names[a] for a, _ in acts], feed)
    sums_model, names = _with_products(gm, acts, {}, model)
    got = dict(zip(names.values(), runtime.session(sums_model).run(list(names.values()), feed)))
    for i, key in enumerate(acts):
        want = per_position(full[i], full[i + len(acts)], 1)
        np.testing.assert_allclose(np.abs(got[names[key]]).sum(axis=0), want, rtol=1e-5, err_msg=key[0])
    assert names[(h, 1)] != names[(r, 1)]
