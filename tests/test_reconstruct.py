"""Reconstruction after pruning: exact recovery of planted cases, never worse, bias mode, BN statistics.

Every pruned model here is made by slicing the original's initializers by hand,
so the expected answers are known independently of the pruning engine.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import helper, numpy_helper

from onnxprune import runtime
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError
from onnxprune.reconstruct import reconstruct
from onnxprune.reconstruct import layers as rlayers
from onnxprune import ir


# ---------------------------------------------------------------- helpers

def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def node(model: onnx.ModelProto, op: str, k: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op][k]


def set_inits(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> None:
    for t in model.graph.initializer:
        if t.name in values:
            t.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[t.name]).astype(np.float32), t.name))


def sliced(model: onnx.ModelProto, cuts: dict[str, tuple[int, list[int]] | list[tuple[int, list[int]]]],
           attrs: dict | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with initializer ``name`` cut to ``index`` along ``axis`` (or several such cuts):
    a pruned model made by hand."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    w = inits(model)
    for name, cut in cuts.items():
        for axis, idx in (cut if isinstance(cut, list) else [cut]):
            w[name] = np.take(w[name], idx, axis=axis)
    set_inits(m, {name: w[name] for name in cuts})
    for (node_name, key), value in (attrs or {}).items():
        n = next(n for n in m.graph.node if n.name == node_name)
        for a in n.attribute:
            if a.name == key:
                a.CopyFrom(helper.make_attribute(key, value))
    onnx.checker.check_model(m)
    return m


def outputs(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    names = names or [o.name for o in model.graph.output]
    sess = runtime.session(runtime.with_outputs(model, names), optimize=False)
    return runtime.run(sess, {model.graph.input[0].name: x.astype(np.float32)}, names)


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def data(x: np.ndarray, name: str = "x") -> ArrayData:
    return ArrayData({name: x.astype(np.float32)})


def keep(n: int, drop) -> list[int]:
    return [i for i in range(n) if i not in set(drop)]


def conv_chain(group: int = 1, bias: bool = True, seed: int = 0) -> tuple[onnx.ModelProto, list[str]]:
    """x -> conv(3->8) -> relu -> conv(8->6, group) ; returns the model and the two Conv names."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=seed)
    g.output(g.conv(g.relu(g.conv("x", 8)), 6, group=group, bias=bias))
    m = g.build()
    return m, [n.name for n in m.graph.node if n.op_type == "Conv"]


def duplicate(model: onnx.ModelProto, weight: str, bias: str | None, pairs: dict[int, tuple[int, float]]) -> None:
    """Plant output channel ``dst`` = ``scale`` x channel ``src`` (scale > 0 commutes with Relu)."""
    w = inits(model)
    vals = {weight: w[weight].copy()}
    if bias:
        vals[bias] = w[bias].copy()
    for dst, (src, scale) in pairs.items():
        for name in vals:
            vals[name][dst] = scale * vals[name][src]
    set_inits(model, vals)


def rng_images(n=48, c=3, hw=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, c, hw, hw)).astype(np.float32)


# ---------------------------------------------------------------- the linear views are exact

@pytest.mark.parametrize("attrs", [
    dict(strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]),
    dict(strides=[2, 1], pads=[0, 1, 2, 0], dilations=[2, 1], group=2),
    dict(strides=[3, 3], pads=[0, 0, 0, 0]),
    dict(strides=[1, 1], pads=[3, 3, 3, 3]),
])
def test_conv_transpose_as_linear_map_matches_onnxruntime(attrs):
    g = GraphBuilder("x", [2, 4, 5, 6], seed=3)
    grp = attrs.get("group", 1)
    w = g.weight([4, 6 // grp, 3, 3])
    b = g.const(np.arange(6, dtype=np.float32) * 0.1)
    g.output(g.op("ConvTranspose", ["x", w, b], kernel_shape=[3, 3], **attrs))
    model = g.build()
    x = rng_images(2, 4, 5)[:, :, :, :6] if False else np.random.default_rng(0).standard_normal((2, 4, 5, 6)).astype(
        np.float32)
    y = next(iter(outputs(model, x).values()))
    gnode = ir.to_graph(model).nodes[0]
    lin, why = rlayers.linear(gnode)
    assert lin is not None, why
    rows = np.arange(y.shape[0] * int(np.prod(y.shape[2:])))
    X = lin.rule.features(lin, x.astype(np.float64), rows)               # [G, R, K]
    pred = np.concatenate([X[j] @ lin.W[j].T for j in range(lin.groups)], axis=1) + lin.b
    np.testing.assert_allclose(pred, lin.rule.targets(y, rows), atol=1e-5)
    # and writing the same map back gives the same weights
    before = gnode.inputs[1].values.copy()
    lin.rule.write(ir.to_graph(model), lin, lin.W, lin.b)
    np.testing.assert_allclose(gnode.inputs[1].values, before, atol=1e-7)


# ---------------------------------------------------------------- (1) planted cases are recovered exactly

def check_recovered(original, pruned, kept_inputs, x, tol=1e-4, **kw):
    out, rep = reconstruct(original, pruned, kept_inputs, data(x), ridge=1e-9, **kw)
    ref = list(outputs(original, x).values())
    before = list(outputs(pruned, x).values())
    after = list(outputs(out, x).values())
    assert rel_error(before[0], ref[0]) > 0.05, "the planted pruning should hurt before reconstruction"
    assert rel_error(after[0], ref[0]) < tol, rep.layers
    # every layer that had something to fix kept its refit (the depthwise one has nothing to fix)
    assert all(r.status == "kept" for r in rep.layers if r.kind == "ls" and r.error_before > 1e-9), rep.layers
    return out, rep


def test_planted_conv_duplicates_recovered_exactly():
    m, (c1, c2) = conv_chain()
    w1, b1 = node(m, "Conv").input[1:3]
    duplicate(m, w1, b1, {5: (1, 1.0), 6: (2, 2.5)})
    drop = [5, 6]
    w2 = node(m, "Conv", 1).input[1]
    pruned = sliced(m, {w1: (0, keep(8, drop)), b1: (0, keep(8, drop)), w2: (1, keep(8, drop))})
    out, rep = check_recovered(m, pruned, {c2: keep(8, drop)}, rng_images())
    assert rep.layers[0].error_after < 1e-8 < rep.layers[0].error_before
    assert rep.fidelity["reconstructed"]["rel_error"] < 1e-4 < rep.fidelity["pruned"]["rel_error"]


def test_planted_grouped_conv_recovered_exactly():
    m, (c1, c2) = conv_chain(group=2)
    w1, b1 = node(m, "Conv").input[1:3]
    duplicate(m, w1, b1, {3: (1, 1.0), 7: (5, 0.5)})          # one channel per group of conv2
    w2 = node(m, "Conv", 1).input[1]
    pruned = sliced(m, {w1: (0, keep(8, [3, 7])), b1: (0, keep(8, [3, 7])), w2: (1, [0, 1, 2])})
    check_recovered(m, pruned, {c2: keep(8, [3, 7])}, rng_images())


def test_planted_depthwise_then_conv_recovered_exactly():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=2)
    h = g.relu(g.conv("x", 8))
    d = g.conv(h, 8, group=8)
    g.output(g.conv(g.relu(d), 4, k=1))
    m = g.build()
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    (w1, b1), (wd, bd), w3 = convs[0].input[1:3], convs[1].input[1:3], convs[2].input[1]
    duplicate(m, w1, b1, {5: (1, 1.0)})
    duplicate(m, wd, bd, {5: (1, 1.0)})
    k = keep(8, [5])
    pruned = sliced(m, {w1: (0, k), b1: (0, k), wd: (0, k), bd: (0, k), w3: (1, k)},
                    attrs={(convs[1].name, "group"): 7})
    # one pass for both levels (stages=1): the depthwise refit is the identity, so the order does not matter
    check_recovered(m, pruned, {convs[1].name: k, convs[2].name: k}, rng_images(), stages=1)


@pytest.mark.parametrize("bias", [True, False])
def test_planted_gemm_matmul_chain_recovered_exactly(bias):
    g = GraphBuilder("x", [1, 6], dynamic_batch=True, seed=4)
    h = g.relu(g.gemm("x", 8))
    g.output(g.matmul(h, 5, bias=bias))
    m = g.build()
    gemm, mm = node(m, "Gemm"), node(m, "MatMul")
    duplicate(m, gemm.input[1], gemm.input[2], {2: (0, 1.0), 6: (3, 3.0), 7: (3, 0.5)})
    k = keep(8, [2, 6, 7])
    pruned = sliced(m, {gemm.input[1]: (0, k), gemm.input[2]: (0, k), mm.input[1]: (0, k)})
    x = np.random.default_rng(5).standard_normal((64, 6))
    out, _ = check_recovered(m, pruned, {mm.name: k}, x)
    # the intercept goes into the existing Add, or into one new Add
    assert sum(n.op_type == "Add" for n in out.graph.node) == 1


def test_planted_conv_transpose_recovered_exactly():
    g = GraphBuilder("x", [1, 3, 6, 6], dynamic_batch=True, seed=6)
    h = g.relu(g.conv("x", 8))
    w = g.weight([8, 2, 3, 3])
    g.output(g.op("ConvTranspose", [h, w, g.const(np.zeros(4, np.float32))], kernel_shape=[3, 3], strides=[2, 2],
                  pads=[1, 1, 1, 1], output_padding=[1, 1], group=2))
    m = g.build()
    c1, ct = node(m, "Conv"), node(m, "ConvTranspose")
    duplicate(m, c1.input[1], c1.input[2], {2: (0, 1.0), 6: (7, 2.0)})    # one channel per group
    k = keep(8, [2, 6])
    pruned = sliced(m, {c1.input[1]: (0, k), c1.input[2]: (0, k), ct.input[1]: (0, k)})
    check_recovered(m, pruned, {ct.name: k}, rng_images(40, 3, 6))


# ---------------------------------------------------------------- (2) never worse

def single_layer(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The node ``name`` alone, its constant inputs included, as a model of its first input."""
    n = next(n for n in model.graph.node if n.name == name)
    consts = [t for t in model.graph.initializer if t.name in n.input[1:]]
    graph = helper.make_graph([n], "one", [helper.make_tensor_value_info(n.input[0], 1, None)],
                              [helper.make_tensor_value_info(n.output[0], 1, None)], consts)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def layer_error(layer: onnx.ModelProto, x: np.ndarray, target: np.ndarray) -> float:
    y = next(iter(outputs(layer, x).values()))
    return float(((y - target) ** 2).sum() / (target ** 2).sum())


def conv_bn_conv(seed: int):
    """Conv(8) -> Relu -> Conv(8) -> BN -> Relu -> Conv(6), with channels 2, 5 and 1, 6 of the two
    8-wide layers cut: (original, pruned, convs, BN node, kept indices of both cuts)."""
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=seed)
    h = g.relu(g.conv("x", 8))
    h = g.relu(g.bn(g.conv(h, 8)))
    g.output(g.conv(h, 6))
    m = g.build()
    c1, c2, c3 = [n for n in m.graph.node if n.op_type == "Conv"]
    bn = node(m, "BatchNormalization")
    k1, k2 = keep(8, [2, 5]), keep(8, [1, 6])
    cuts = {c1.input[1]: (0, k1), c1.input[2]: (0, k1), c2.input[1]: [(0, k2), (1, k1)], c2.input[2]: (0, k2),
            c3.input[1]: (1, k2)}
    cuts.update({t: (0, k2) for t in bn.input[1:]})
    pruned = sliced(m, cuts)
    return m, pruned, (c1, c2, c3), bn, (k1, k2)


def test_random_weights_every_layer_no_worse_on_held_out_data():
    m, pruned, (c1, c2, c3), bn, (k1, k2) = conv_bn_conv(seed=7)
    x = rng_images(64, seed=8)
    out, rep = reconstruct(m, pruned, {c2.name: k1, c3.name: k2}, data(x), positions=None)
    assert {r.node: r.kind for r in rep.layers} == {c2.name: "ls", c3.name: "ls", bn.name: "bn"}
    # every layer's held-out error, measured independently: that layer alone in onnxruntime,
    # fed the reconstructed model's input to it, against the original model's output of it
    held = x[48:]
    ref = outputs(m, held, [c2.output[0], c3.output[0], bn.output[0]])
    kept_out = {c2.name: k2, c3.name: list(range(6)), bn.name: k2}
    for r in rep.layers:
        n = next(n for n in m.graph.node if n.name == r.node)
        x_in = outputs(out, held, [n.input[0]])[n.input[0]]
        target = ref[n.output[0]][:, kept_out[r.node]]
        before, after = (layer_error(single_layer(mm, r.node), x_in, target) for mm in (pruned, out))
        assert after <= before + 1e-9, r
        assert r.error_before == pytest.approx(before, rel=1e-3, abs=1e-7), r
        if r.status == "kept":
            assert r.error_after == pytest.approx(after, rel=1e-3, abs=1e-7), r
        else:
            assert after == before and r.error_after >= r.error_before, r
    assert rep.layers[0].status == "kept" and rep.layers[0].error_after < 0.5 * rep.layers[0].error_before
    assert rep.fidelity["reconstructed"]["rel_error"] < rep.fidelity["pruned"]["rel_error"]


def test_refit_that_would_hurt_held_out_data_is_rejected():
    g = GraphBuilder("x", [1, 6], dynamic_batch=True, seed=9)
    h = g.relu(g.op("Gemm", ["x", g.const(np.eye(6, dtype=np.float32)), g.const(np.zeros(6, np.float32))]))
    g.output(g.gemm(h, 3))
    m = g.build()
    g1, g2 = node(m, "Gemm"), node(m, "Gemm", 1)
    k = keep(6, [5])
    pruned = sliced(m, {g1.input[1]: (1, k), g1.input[2]: (0, k), g2.input[1]: (1, k)})   # g1: transB=0
    x = np.random.default_rng(10).standard_normal((40, 6))
    x[:30, 5] = x[:30, 0]          # fitted on: channel 5 copies channel 0, so the fit moves its weight there
    x[30:, 5] = 0.0                # held out: channel 5 is silent, so the pruned layer is already exact
    out, rep = reconstruct(m, pruned, {g2.name: k}, data(x), holdout=0.25, ridge=1e-9)
    r = rep.layers[0]
    assert r.status == "rejected" and r.error_after > r.error_before, r
    assert inits(out)[g2.input[1]].tobytes() == inits(pruned)[g2.input[1]].tobytes()
    # the same data without the trap: the refit is kept
    x[30:, 5] = x[30:, 0]
    _, rep = reconstruct(m, pruned, {g2.name: k}, data(x), holdout=0.25, ridge=1e-9)
    assert rep.layers[0].status == "kept" and rep.layers[0].error_after < 1e-8


def test_huge_ridge_leaves_the_layer_as_it_is():
    m, (c1, c2) = conv_chain(seed=11)
    w1, b1 = node(m, "Conv").input[1:3]
    w2 = node(m, "Conv", 1).input[1]
    k = keep(8, [0, 3])
    pruned = sliced(m, {w1: (0, k), b1: (0, k), w2: (1, k)})
    out, rep = reconstruct(m, pruned, {c2: k}, data(rng_images()), ridge=1e12)
    np.testing.assert_allclose(inits(out)[w2], inits(pruned)[w2], atol=1e-6)
    assert rep.layers[0].error_after <= rep.layers[0].error_before


# ---------------------------------------------------------------- (3) bias compensation

@pytest.mark.parametrize("bias", [True, False])
def test_bias_mode_lowers_output_error(bias):
    m, (c1, c2) = conv_chain(bias=bias, seed=12)
    w1, b1 = node(m, "Conv").input[1:3]
    set_inits(m, {b1: inits(m)[b1] + 1.0})              # Relu outputs with a clearly non-zero mean
    w2 = node(m, "Conv", 1).input[1]
    k = keep(8, [1, 4, 6])
    pruned = sliced(m, {w1: (0, k), b1: (0, k), w2: (1, k)})
    x = rng_images(64, seed=13)
    out, rep = reconstruct(m, pruned, {c2: k}, data(x), mode="bias")
    ref, before, after = (next(iter(outputs(mm, x).values())) for mm in (m, pruned, out))
    assert rep.layers[0].kind == "bias" and rep.layers[0].status == "kept"
    assert rel_error(after, ref) < 0.8 * rel_error(before, ref)
    assert len(node(out, "Conv", 1).input) == 3


# ---------------------------------------------------------------- (4) BatchNormalization statistics

def test_bn_reestimation_reproduces_batch_statistics():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=14)
    h = g.relu(g.conv("x", 6))
    h = g.conv(h, 8, bias=False)
    g.output(g.conv(g.relu(g.bn(h)), 4))
    m = g.build()
    c0, c1 = node(m, "Conv"), node(m, "Conv", 1)
    bn = node(m, "BatchNormalization")
    # channels 3..5 duplicate 0..2 with the same outgoing weights: pruning them halves the BN input,
    # which only re-estimated statistics can undo
    duplicate(m, c0.input[1], c0.input[2], {3: (0, 1.0), 4: (1, 1.0), 5: (2, 1.0)})
    w1 = inits(m)[c1.input[1]].copy()
    w1[:, 3:] = w1[:, :3]
    set_inits(m, {c1.input[1]: w1})
    x = rng_images(64, seed=15)
    fit = x[:48]
    # the original's running statistics are its batch statistics on the fitted data
    h0 = outputs(m, fit, [c1.output[0]])[c1.output[0]]
    set_inits(m, {bn.input[3]: h0.mean((0, 2, 3)), bn.input[4]: h0.var((0, 2, 3))})
    k = [0, 1, 2]
    pruned = sliced(m, {c0.input[1]: (0, k), c0.input[2]: (0, k), c1.input[1]: (1, k)})
    out, rep = reconstruct(m, pruned, {c1.name: k}, data(x), mode="bias")
    r = {r.kind: r for r in rep.layers}["bn"]
    assert r.status == "kept" and r.error_after < 0.1 * r.error_before, rep.layers
    hp = outputs(out, fit, [bn.input[0]])[bn.input[0]]
    np.testing.assert_allclose(inits(out)[bn.input[3]], hp.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inits(out)[bn.input[4]], hp.var((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert inits(out)[bn.input[4]].mean() < 0.5 * h0.var((0, 2, 3)).mean()


def test_bn_after_an_exact_refit_is_left_alone():
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True, seed=16)
    h = g.relu(g.conv("x", 8))
    g.output(g.conv(g.relu(g.bn(g.conv(h, 6))), 4))
    m = g.build()
    c1, c2 = node(m, "Conv"), node(m, "Conv", 1)
    bn = node(m, "BatchNormalization")
    duplicate(m, c1.input[1], c1.input[2], {7: (1, 1.0)})
    k = keep(8, [7])
    pruned = sliced(m, {c1.input[1]: (0, k), c1.input[2]: (0, k), c2.input[1]: (1, k)})
    out, rep = reconstruct(m, pruned, {c2.name: k}, data(rng_images(32, seed=17)), ridge=1e-9)
    r = {r.kind: r for r in rep.layers}
    assert r["ls"].status == "kept" and r["bn"].stage == 1
    # the refit made the BN input the original's again: re-estimation finds nothing to do
    assert r["bn"].error_before < 1e-9 and r["bn"].status == "rejected"
    assert all(inits(out)[t].tobytes() == inits(m)[t].tobytes() for t in bn.input[1:])


# ---------------------------------------------------------------- interface

def test_shared_weight_is_skipped_and_reported():
    g = GraphBuilder("x", [1, 6], dynamic_batch=True, seed=18)
    h = g.relu(g.gemm("x", 8))
    w = g.weight([8, 4])
    a = g.op("MatMul", [h, w])
    b = g.op("MatMul", [g.relu(h), w])
    g.output(g.add(a, b))
    m = g.build()
    g1 = node(m, "Gemm")
    k = keep(8, [3])
    pruned = sliced(m, {g1.input[1]: (0, k), g1.input[2]: (0, k), w: (0, k)})
    mm = [n.name for n in m.graph.node if n.op_type == "MatMul"]
    out, rep = reconstruct(m, pruned, {n: k for n in mm}, data(np.random.default_rng(0).standard_normal((16, 6))))
    assert [r.status for r in rep.layers] == ["skipped", "skipped"]
    assert "shared by 2 nodes" in rep.layers[0].reason
    assert rep.to_json()["totals"]["skipped"] == 2


def test_bad_arguments_are_user_errors():
    m, (c1, c2) = conv_chain()
    x = data(rng_images(8))
    with pytest.raises(OnnxPruneError, match="choose one of"):
        reconstruct(m, m, {}, x, mode="lsq")
    with pytest.raises(OnnxPruneError, match="at least 2 samples"):
        reconstruct(m, m, {}, data(rng_images(1)))
    out, rep = reconstruct(m, m, {c2: list(range(8))}, x, mode="none")
    assert out is m and rep.layers == []


# ---------------------------------------------------------------- (5) the fast path keeps the answers

def test_queued_targets_give_the_same_refit_as_one_pass_of_both_models():
    """Targets queued from the original model's single pass (the default) or re-tapped in the
    pruned model's pass (over the cache budget): the same sums, so the same weights."""
    m, pruned, (c1, c2, c3), bn, (k1, k2) = conv_bn_conv(seed=12)
    x = data(rng_images(48, seed=13))
    runs = [reconstruct(m, pruned, {c2.name: k1, c3.name: k2}, x, positions=None, stages=None, cache_bytes=b)
            for b in (1 << 30, 0)]
    (queued, rq), (live, rl) = runs
    assert rq.cached_mb > 0 and rl.cached_mb == 0
    assert [r.status for r in rq.layers] == [r.status for r in rl.layers] and rq.totals["kept"] >= 2
    for name, w in inits(queued).items():
        np.testing.assert_allclose(w, inits(live)[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_float32_gram_matches_float64_on_offset_data():
    """Wide layers accumulate each chunk in float32 around a shift; the solve and the error must
    agree with float64 sums even when the features sit far from zero (cancellation)."""
    from onnxprune.reconstruct.fits import Gram

    rng = np.random.default_rng(14)
    k, c, n = 300, 5, 5000
    X = (50 + rng.standard_normal((1, n, k))).astype(np.float32)
    W_true = rng.standard_normal((1, c, k)) / np.sqrt(k)
    Y = (np.einsum("gnk,gck->gnc", X.astype(np.float64) - 50, W_true) + 0.01 * rng.standard_normal((1, n, c)))
    grams = {}
    for name, cut in (("f32", 256), ("f64", 10 ** 9)):
        Gram.FLOAT32_FROM, saved = cut, Gram.FLOAT32_FROM
        try:
            gr = Gram(1, k, c, chunk=700)
            for i in range(0, n, 1000):
                gr.add(X[:, i:i + 1000], Y[:, i:i + 1000].astype(np.float32))
            grams[name] = gr
        finally:
            Gram.FLOAT32_FROM = saved
    assert grams["f32"].dtype == np.float32 and grams["f64"].dtype == np.float64
    W0, b0 = np.zeros((1, c, k)), np.zeros((1, c))
    (W32, b32), (W64, b64) = (grams[s].solve(W0, b0, 1e-3) for s in ("f32", "f64"))
    np.testing.assert_allclose(W32, W64, rtol=1e-3, atol=1e-4)
    e32, e64 = grams["f32"].error(W32, b32), grams["f64"].error(W64, b64)
    assert e64 < 1e-3 and e32 == pytest.approx(e64, rel=1e-2, abs=1e-6)
    assert grams["f32"].error(W0, b0) == pytest.approx(1.0, rel=1e-6)


def test_model_fixing_batch_one_is_tapped_in_batches_when_nothing_depends_on_it():
    from onnxprune.reconstruct import passes

    def chain(dynamic: bool) -> onnx.ModelProto:
        g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=dynamic, seed=15)
        g.output(g.conv(g.relu(g.conv("x", 8)), 6))
        return g.build()

    x = data(rng_images(40, seed=16))
    k = keep(8, [1, 4])
    got = {}
    for dynamic in (True, False):
        m = chain(dynamic)
        c1, c2 = [n for n in m.graph.node if n.op_type == "Conv"]
        pruned = sliced(m, {c1.input[1]: (0, k), c1.input[2]: (0, k), c2.input[1]: (1, k)})
        got[dynamic] = reconstruct(m, pruned, {c2.name: k}, x, positions=None)
    assert passes.batch_is_free(chain(False), x)
    assert any("taps run batches of 8" in n for n in got[False][1].notes)
    for name, w in inits(got[True][0]).items():
        np.testing.assert_allclose(inits(got[False][0])[name], w, rtol=1e-5, atol=1e-6, err_msg=name)

    # a graph that bakes batch 1 into a shape is not free: batches of 1, as exported
    g = GraphBuilder("x", [1, 3, 8, 8], seed=17)
    h = g.reshape(g.relu(g.conv("x", 8)), [1, -1])
    g.output(g.gemm(h, 4))
    baked = g.build()
    assert not passes.batch_is_free(baked, x)
    c, gm = node(baked, "Conv"), node(baked, "Gemm")
    cols = [c_ * 64 + p for c_ in k for p in range(64)]
    pruned = sliced(baked, {c.input[1]: (0, k), c.input[2]: (0, k), gm.input[1]: (1, cols)})
    _, rep = reconstruct(baked, pruned, {gm.name: cols}, x, positions=None)
    assert any("batches of 1" in n for n in rep.notes) and rep.layers[0].status == "kept"
