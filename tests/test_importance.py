"""Importance criteria on hand-made groups with known answers (real graphs, real onnxruntime runs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import numpy_helper

from onnxprune import runtime
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError
from onnxprune.groups import ACTIVATION, PARAM, WEIGHT_IN, WEIGHT_OUT, Analysis, Group, Member
from onnxprune.importance import CRITERIA, ScoreContext, requires_data, score_groups
from onnxprune.importance.base import combine

LAYERS = ("Conv", "Gemm", "MatMul")
PASS_THROUGH = ("Relu", "BatchNormalization", "Add", "Identity", "LeakyRelu")


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _out_axis(node) -> int:
    if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
        return 0
    return 1


def _in_axis(node) -> int:
    if node.op_type == "Conv" or (node.op_type == "Gemm" and _attr(node, "transB", 0)):
        return 1
    return 0


def chain_group(model: onnx.ModelProto, producer_out: str, gid: int = 0) -> Group:
    """The group of one layer's output channels, followed through Relu/BN/Flatten to the consuming layers.

    A miniature of the analysis for straight chains: Flatten maps its spatial positions to their channel.
    """
    nodes = list(model.graph.node)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    shapes = _shapes(model)
    prod = next(n for n in nodes if producer_out in n.output)
    axis = _out_axis(prod)
    size = inits[prod.input[1]].shape[axis]
    idx = np.arange(size)
    members = [Member(prod.input[1], axis, idx, WEIGHT_OUT, prod.name, prod.op_type, 1)]
    if prod.op_type == "Conv" and len(prod.input) > 2:
        members.append(Member(prod.input[2], 0, idx, PARAM, prod.name, prod.op_type, 2))
    frontier = [(producer_out, 1 if prod.op_type in ("Conv", "Gemm") else len(shapes[producer_out]) - 1, idx, prod)]
    while frontier:
        t, ax, index, src = frontier.pop()
        members.append(Member(t, ax, index, ACTIVATION, src.name, src.op_type))
        for c in nodes:
            if t not in c.input:
                continue
            if c.op_type in LAYERS and c.input[0] == t:
                members.append(Member(c.input[1], _in_axis(c), index, WEIGHT_IN, c.name, c.op_type, 1))
            elif c.op_type == "BatchNormalization":
                members += [Member(c.input[i], 0, index, PARAM, c.name, c.op_type, i) for i in range(1, 5)]
                frontier.append((c.output[0], ax, index, c))
            elif c.op_type in PASS_THROUGH:
                frontier.append((c.output[0], ax, index, c))
            elif c.op_type == "Flatten":
                per = int(np.prod(shapes[t][2:]))
                frontier.append((c.output[0], 1, np.repeat(index, per), c))
            elif c.op_type == "Add" and c.input[1] in inits:   # MatMul bias
                frontier.append((c.output[0], ax, index, c))
    return Group(gid, size, members, label=prod.name)


def _shapes(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    out = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        out[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    return out


def analysis_of(model, groups) -> Analysis:
    return Analysis(groups, [], _shapes(model), {})


def set_init(model, name, value) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
            return
    raise KeyError(name)


def init(model, name) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name).copy()


def ctx_for(model, groups, data=None, **kw) -> ScoreContext:
    return ScoreContext(model, analysis_of(model, groups), data=data, **kw)


def rand_data(shape, n=48, seed=1, name="x") -> ArrayData:
    return ArrayData({name: np.random.default_rng(seed).standard_normal([n, *shape[1:]]).astype(np.float32)})


# ---------------------------------------------------------------- graphs

def conv_chain(dead: int | None = None, zero: int | None = None):
    """x -> Conv(6) -> Relu -> Conv(5); channel ``dead`` never fires, channel ``zero`` has all-zero weights."""
    g = GraphBuilder("x", [1, 3, 8, 8], seed=3, dynamic_batch=True)
    h = g.conv("x", 6, k=3)
    r = g.relu(h)
    g.output(g.conv(r, 5, k=3))
    m = g.build()
    conv1, conv2 = [n for n in m.graph.node if n.op_type == "Conv"]
    if dead is not None:
        w, b = init(m, conv1.input[1]), init(m, conv1.input[2])
        w[dead], b[dead] = 0.0, -1.0
        set_init(m, conv1.input[1], w)
        set_init(m, conv1.input[2], b)
    if zero is not None:
        w, b, w2 = init(m, conv1.input[1]), init(m, conv1.input[2]), init(m, conv2.input[1])
        w[zero], b[zero], w2[:, zero] = 0.0, 0.0, 0.0
        for name, v in ((conv1.input[1], w), (conv1.input[2], b), (conv2.input[1], w2)):
            set_init(m, name, v)
    return m, h


def mlp(hidden=6, nin=8, nout=4, relu=True, seed=5):
    """x[N, nin] -> MatMul(hidden) + b [-> Relu] -> MatMul(nout) + b; returns (model, MatMul output, consumer input)."""
    g = GraphBuilder("x", [1, nin], seed=seed, dynamic_batch=True)
    h = g.matmul("x", hidden)
    r = g.relu(h) if relu else h
    g.output(g.matmul(r, nout))
    m = g.build()
    mm = next(n for n in m.graph.node if n.op_type == "MatMul")
    return m, mm.output[0], r


# ---------------------------------------------------------------- weight criteria

@pytest.mark.parametrize("crit", ["l1", "l2", "lamp", "fpgm"])
def test_all_zero_channel_ranks_last_for_weight_criteria(crit):
    m, h = conv_chain(zero=4)
    grp = chain_group(m, h)
    s = score_groups([grp], ctx_for(m, [grp]), crit)[grp.id]
    assert s.shape == (6,) and s.dtype == np.float64
    assert int(np.argmin(s)) == 4
    assert np.all(np.delete(s, 4) > s[4])


def test_l1_l2_sum_all_coupled_weights_then_normalise():
    m, h = conv_chain()
    grp = chain_group(m, h)
    conv1, conv2 = [n for n in m.graph.node if n.op_type == "Conv"]
    w1, w2 = init(m, conv1.input[1]).astype(np.float64), init(m, conv2.input[1]).astype(np.float64)
    out_l1, in_l1 = np.abs(w1).sum(axis=(1, 2, 3)), np.abs(w2).sum(axis=(0, 2, 3))
    want = (out_l1 / out_l1.mean() + in_l1 / in_l1.mean()) / 2
    np.testing.assert_allclose(score_groups([grp], ctx_for(m, [grp]), "l1")[grp.id], want, rtol=1e-12)
    out_l2, in_l2 = np.sqrt((w1 ** 2).sum(axis=(1, 2, 3))), np.sqrt((w2 ** 2).sum(axis=(0, 2, 3)))
    got = score_groups([grp], ctx_for(m, [grp]), "l2", reduction="max")[grp.id]
    np.testing.assert_allclose(got, np.maximum(out_l2 / out_l2.mean(), in_l2 / in_l2.mean()), rtol=1e-12)


def test_group_reduction_mean_sum_max():
    # one producer, two consumers -> three weight members with known normalised scores
    g = GraphBuilder("x", [1, 3, 6, 6], seed=7, dynamic_batch=True)
    h = g.conv("x", 4, k=1)
    r = g.relu(h)
    g.output(g.conv(r, 3, k=1))
    g.output(g.conv(r, 2, k=1))
    m = g.build()
    grp = chain_group(m, h)
    assert len(grp.of_kind(WEIGHT_IN)) == 2
    per = []
    for mem in grp.of_kind(WEIGHT_OUT, WEIGHT_IN):
        w = np.moveaxis(init(m, mem.tensor).astype(np.float64), mem.axis, 0).reshape(4, -1)
        s = np.abs(w).sum(axis=1)
        per.append(s / s.mean())
    per = np.stack(per)
    for red, fn in (("mean", np.mean), ("sum", np.sum), ("max", np.max)):
        got = score_groups([grp], ctx_for(m, [grp]), "l1", reduction=red)[grp.id]
        np.testing.assert_allclose(got, fn(per, axis=0), rtol=1e-12)
    with pytest.raises(OnnxPruneError, match="group-reduction"):
        score_groups([grp], ctx_for(m, [grp]), "l1", reduction="median")


def test_lamp_normalisation_known_values():
    from onnxprune.importance.base import normalize_lamp
    s = np.array([4.0, 1.0, 0.0, 3.0, 2.0])
    # sorted ascending 0,1,2,3,4: each over the sum of itself and everything larger
    np.testing.assert_allclose(normalize_lamp(s), [4 / 4, 1 / 10, 0, 3 / 7, 2 / 9])


def test_fpgm_ranks_the_geometric_median_last_even_with_the_largest_norm():
    g = GraphBuilder("x", [1, 2, 4, 4], seed=2, dynamic_batch=True)
    h = g.conv("x", 5, k=1, bias=False)
    g.output(g.conv(g.relu(h), 3, k=1))
    m = g.build()
    conv1, conv2 = [n for n in m.graph.node if n.op_type == "Conv"]
    c, v, u = np.array([5.0, 5.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0])
    filters = np.stack([c + v, c - v, c + u, c - u, c])           # channel 4 is the centre of the others
    set_init(m, conv1.input[1], filters.reshape(5, 2, 1, 1))
    set_init(m, conv2.input[1], np.ones((3, 5, 1, 1)))            # identical columns: no preference
    grp = chain_group(m, h)
    fp = score_groups([grp], ctx_for(m, [grp]), "fpgm")[grp.id]
    assert int(np.argmin(fp)) == 4
    l2 = score_groups([grp], ctx_for(m, [grp]), "l2")[grp.id]
    assert int(np.argmin(l2)) != 4


def test_bn_scale_ranks_tiny_gamma_last_and_explains_missing_bn():
    g = GraphBuilder("x", [1, 3, 6, 6], seed=4, dynamic_batch=True)
    h = g.conv("x", 5, k=3)
    g.output(g.conv(g.relu(g.bn(h)), 2, k=3))
    m = g.build()
    bn = next(n for n in m.graph.node if n.op_type == "BatchNormalization")
    gamma = init(m, bn.input[1])
    gamma[1] = 1e-4
    set_init(m, bn.input[1], gamma)
    grp = chain_group(m, h)
    s = score_groups([grp], ctx_for(m, [grp]), "bn-scale")[grp.id]
    assert int(np.argmin(s)) == 1
    np.testing.assert_allclose(s, np.abs(gamma) / np.abs(gamma).mean(), rtol=1e-6)

    m2, h2 = conv_chain()
    grp2 = chain_group(m2, h2)
    with pytest.raises(OnnxPruneError, match="no BatchNormalization.*--criterion l2"):
        score_groups([grp2], ctx_for(m2, [grp2]), "bn-scale")


def test_bn_scale_falls_back_to_l2_on_groups_without_bn():
    from onnxprune.analysis import analyze
    g = GraphBuilder("x", [1, 3, 6, 6], seed=5, dynamic_batch=True)
    a = g.relu(g.bn(g.conv("x", 6, k=3)))               # group with a BatchNormalization
    b = g.relu(g.conv(a, 4, k=3))                        # group without one
    g.output(g.conv(b, 2, k=1))
    m = g.build()
    an = analyze(m)
    ctx = ScoreContext(m, an)
    scores = score_groups(an.prunable, ctx, "bn-scale")
    with_bn = [grp.id for grp in an.prunable if any(mb.op == "BatchNormalization" for mb in grp.members)]
    assert len(with_bn) == 1 and len(scores) == 2
    assert ctx.fallbacks == {grp.id: "l2" for grp in an.prunable if grp.id not in with_bn}
    l2 = score_groups(an.prunable, ScoreContext(m, an), "l2")
    (other,) = set(ctx.fallbacks)
    np.testing.assert_allclose(scores[other], l2[other])


def test_gradient_criteria_skip_the_statistics_pass():
    m, h = conv_chain()
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 3, 8, 8], n=4))
    score_groups([grp], ctx, "taylor")
    assert ctx._stats is None                            # no activation-statistics pass was run
    score_groups([grp], ctx, "act-mean")
    assert ctx._stats is not None


def test_random_is_seeded_and_reproducible():
    m, h = conv_chain()
    a, b = chain_group(m, h, gid=0), chain_group(m, h, gid=1)
    r1 = score_groups([a, b], ctx_for(m, [a, b], seed=3), "random")
    r2 = score_groups([b, a], ctx_for(m, [a, b], seed=3), "random")
    r3 = score_groups([a, b], ctx_for(m, [a, b], seed=4), "random")
    np.testing.assert_array_equal(r1[0], r2[0])
    np.testing.assert_array_equal(r1[1], r2[1])
    assert not np.array_equal(r1[0], r1[1]) and not np.array_equal(r1[0], r3[0])
    assert np.all((r1[0] >= 0) & (r1[0] < 1))


# ---------------------------------------------------------------- calibration criteria

CALIB = ["act-mean", "apoz", "wanda", "fluctuation", "obs", "entropy", "lasso"]


@pytest.mark.parametrize("crit", CALIB)
def test_dead_channel_ranks_last_for_calibration_criteria(crit):
    m, h = conv_chain(dead=2)
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 3, 8, 8], n=24), batch_size=10)
    s = score_groups([grp], ctx, crit)[grp.id]
    assert s.shape == (6,) and np.all(np.isfinite(s))
    assert int(np.argmin(s)) == 2, s
    assert np.all(np.delete(s, 2) > s[2] + 1e-9), s
    assert ctx.fallbacks == {}
    assert requires_data(crit)


def test_calibration_criterion_without_data_is_a_user_error():
    m, h = conv_chain()
    grp = chain_group(m, h)
    with pytest.raises(OnnxPruneError, match="needs calibration data"):
        score_groups([grp], ctx_for(m, [grp]), "wanda")
    with pytest.raises(OnnxPruneError, match="unknown importance criterion 'magnitude'"):
        score_groups([grp], ctx_for(m, [grp]), "magnitude")
    assert not requires_data("l2") and not requires_data("random")


def test_wanda_and_fluctuation_known_values_on_a_linear_layer():
    m, h, hin = mlp(relu=False)
    grp = chain_group(m, h)
    data = rand_data([1, 8], n=40)
    ctx = ctx_for(m, [grp], data=data, batch_size=16)
    hidden = _tensor(m, hin, data)
    w2 = init(m, [n for n in m.graph.node if n.op_type == "MatMul"][1].input[1]).astype(np.float64)
    wanda = np.abs(w2).sum(axis=1) * np.sqrt((hidden ** 2).sum(axis=0))
    flap = hidden.var(axis=0) * (w2 ** 2).sum(axis=1)
    np.testing.assert_allclose(CRITERIA["wanda"].members(grp, ctx)[0], wanda, rtol=1e-6)
    np.testing.assert_allclose(CRITERIA["fluctuation"].members(grp, ctx)[0], flap, rtol=1e-5)


def _tensor(model, name, data) -> np.ndarray:
    sess = runtime.session(runtime.with_outputs(model, [name]), optimize=False)
    return np.concatenate([runtime.run(sess, f, [name])[name] for f in data.batches(64)]).astype(np.float64)


def test_apoz_falls_back_to_act_mean_without_a_relu():
    m, h, _ = mlp(relu=False)
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 8]))
    got = score_groups([grp], ctx, "apoz")[grp.id]
    assert ctx.fallbacks == {grp.id: "act-mean"}
    np.testing.assert_allclose(got, score_groups([grp], ctx_for(m, [grp], data=rand_data([1, 8])), "act-mean")[0])


def test_lasso_recovers_a_planted_sparse_set():
    m, h, _ = mlp(hidden=6, nin=8, nout=3, relu=True, seed=11)
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    w1, w2 = init(m, mm[0].input[1]), init(m, mm[1].input[1])
    w1[:, [0, 2, 3, 5]] *= 4.0                                    # the others fire harder...
    rng = np.random.default_rng(0)
    w2[[0, 2, 3, 5]] = 0.02 * rng.standard_normal((4, 3))         # ...but the output barely uses them
    w2[[1, 4]] = rng.standard_normal((2, 3))
    set_init(m, mm[0].input[1], w1)
    set_init(m, mm[1].input[1], w2)
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 8], n=64))
    s = score_groups([grp], ctx, "lasso")[grp.id]
    assert set(np.argsort(s)[-2:].tolist()) == {1, 4}
    assert set(np.argsort(score_groups([grp], ctx, "act-mean")[grp.id])[-2:].tolist()) != {1, 4}


def _obs_compensated(w: np.ndarray, hinv: np.ndarray, cols: list[int]) -> np.ndarray:
    """W (as [out, D]) after removing columns ``cols`` with the OBS update of the remaining ones."""
    ws = w[:, cols]
    delta = -ws @ np.linalg.solve(hinv[np.ix_(cols, cols)], hinv[cols, :])
    out = w + delta
    out[:, cols] = 0.0
    return out


def _refit_error(m, w2name, w2, hidden, y, data, removed: list[int]) -> float:
    """Output error measured in onnxruntime after removing hidden channels ``removed`` and
    re-fitting the consumer's remaining rows by least squares on the calibration data."""
    keep = [j for j in range(len(w2)) if j not in removed]
    new = np.zeros_like(w2)
    new[keep] = np.linalg.lstsq(hidden[:, keep], hidden @ w2, rcond=None)[0]
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    set_init(m2, w2name, new)
    return float(((_tensor(m2, m.graph.output[0].name, data) - y) ** 2).sum())


def test_obs_scores_are_the_cumulative_refit_error_measured_in_onnxruntime():
    from onnxprune.importance.second_order import obs_errors
    m, h, hin = mlp(hidden=6, nin=8, nout=4, relu=False)
    grp = chain_group(m, h)
    data = rand_data([1, 8], n=64)
    ctx = ctx_for(m, [grp], data=data, damp=0.0)
    score = CRITERIA["obs"].members(grp, ctx)[0]
    hidden = _tensor(m, hin, data)
    w2name = [n for n in m.graph.node if n.op_type == "MatMul"][1].input[1]
    w2 = init(m, w2name).astype(np.float64)
    y = _tensor(m, m.graph.output[0].name, data)
    order = np.argsort(score)
    for i in range(5):                               # greedy order: each score is the error so far
        real = _refit_error(m, w2name, w2, hidden, y, data, order[:i + 1].tolist())
        np.testing.assert_allclose(score[order[i]], real, rtol=2e-3)
    # the first step is the single-removal OBS error, at most the uncompensated one
    single = obs_errors(hidden.T @ hidden, w2.T, np.arange(6), 6, 0.0)
    assert order[0] == np.argmin(single) and score[order[0]] == pytest.approx(single.min(), rel=1e-9)
    for s in range(6):
        np.testing.assert_allclose(single[s], _refit_error(m, w2name, w2, hidden, y, data, [s]), rtol=2e-3)
        assert single[s] <= ((hidden[:, s:s + 1] @ w2[s:s + 1]) ** 2).sum() * (1 + 1e-9)


def test_obs_removes_only_one_of_two_duplicated_channels():
    from onnxprune.importance.second_order import obs_errors, obs_sequence
    m, h, hin = mlp(hidden=6, nin=8, nout=4, relu=True, seed=3)
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    w1, w2 = init(m, mm[0].input[1]), init(m, mm[1].input[1])
    w1[:, 4] = w1[:, 1]                              # hidden channel 4 is a copy of channel 1
    w2[[1, 4]] = 3.0 * w2[[1, 4]]                    # and the output needs what they carry
    set_init(m, mm[0].input[1], w1)
    set_init(m, mm[1].input[1], w2)
    add = next(n for n in m.graph.node if n.op_type == "Add" and mm[0].output[0] in n.input)
    b1 = init(m, add.input[1])
    b1[4] = b1[1]
    set_init(m, add.input[1], b1)
    grp = chain_group(m, h)
    data = rand_data([1, 8], n=200)
    ctx = ctx_for(m, [grp], data=data, damp=1e-6)
    score = score_groups([grp], ctx, "obs")[grp.id]
    # single removal: each copy is free while the other stays, so both look cheapest...
    layer = __import__("onnxprune.importance.layers", fromlist=["x"]).consumer_layers(grp, ctx)[0]
    hgram = ctx.gram(layer.key, layer.gram_spec).gram[0]
    single = obs_errors(hgram, layer.matrix()[0], layer.column_channels()[0], 6, ctx.damp)
    assert set(np.argsort(single)[:2].tolist()) == {1, 4}
    # ...the greedy removes one, after which the other is the most expensive channel to remove
    assert len({1, 4} & set(np.argsort(score)[:2].tolist())) == 1
    assert {1, 4} & {int(np.argmax(score))}
    # with batched steps the coupled copies are never removed together either
    seq = obs_sequence(hgram, layer.matrix()[0], layer.column_channels()[0], ctx.damp, max_steps=2)
    first = [c for c, _ in seq[:3]]
    assert len({1, 4} & set(first)) == 1


@pytest.mark.parametrize("group", [1, 2])
def test_obs_on_conv_uses_the_im2col_gram(group):
    from onnxprune.importance.layers import consumer_layers
    from onnxprune.importance.second_order import obs_errors
    g = GraphBuilder("x", [1, 3, 6, 6], seed=9, dynamic_batch=True)
    h = g.conv("x", 4, k=1)
    out = g.conv(h, 4, k=3, group=group, bias=False)
    g.output(out)
    m = g.build()
    grp = chain_group(m, h)
    data = rand_data([1, 3, 6, 6], n=40)
    ctx = ctx_for(m, [grp], data=data, damp=0.0)
    score = CRITERIA["obs"].members(grp, ctx)[0]
    la = consumer_layers(grp, ctx)[0]
    hg, wg_all, idx = ctx.gram(la.key, la.gram_spec).gram, la.matrix(), la.column_channels()
    err = sum(obs_errors(hg[i], wg_all[i], idx[i], 4, 0.0) for i in range(group))
    from onnxprune.runtime.taps import conv_patches
    conv2 = [n for n in m.graph.node if n.op_type == "Conv"][1]
    w = init(m, conv2.input[1]).astype(np.float64)              # [4, 4/group, 3, 3]
    p = conv_patches(_tensor(m, h, data), [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], group)
    y = _tensor(m, out, data)
    cin_g = 4 // group
    for s in range(4):
        gi, j = divmod(s, cin_g)
        hinv = np.linalg.inv(p[gi].T @ p[gi])
        wg = w.reshape(group, 4 // group, -1)[gi]
        new = w.reshape(group, 4 // group, -1).copy()
        new[gi] = _obs_compensated(wg, hinv, list(range(j * 9, j * 9 + 9)))
        m2 = onnx.ModelProto()
        m2.CopyFrom(m)
        set_init(m2, conv2.input[1], new.reshape(w.shape))
        real = ((_tensor(m2, out, data) - y) ** 2).sum()
        np.testing.assert_allclose(err[s], real, rtol=2e-3)
    # the cheapest channel goes first, with its single-removal error; conv groups merge greedily
    assert score.min() == pytest.approx(err.min(), rel=1e-9) and np.argmin(score) == np.argmin(err)
    assert np.all(np.diff(np.sort(score)) >= 0) and score.max() >= err.max() * (1 - 1e-9)


def test_entropy_ignores_the_scale_of_a_channel():
    # Luo & Wu's entropy sees only the shape of a channel's distribution over the samples:
    # scaling a channel by 1000 leaves its score unchanged, a dead channel scores 0
    m, h, hin = mlp(hidden=4, nin=8, nout=3, relu=True, seed=2)
    grp = chain_group(m, h)
    data = rand_data([1, 8], n=256)
    before = score_groups([grp], ctx_for(m, [grp], data=data), "entropy")[grp.id]
    mm = [n for n in m.graph.node if n.op_type == "MatMul"]
    w1 = init(m, mm[0].input[1])
    w1[:, 2] *= 1000.0
    w1[:, 3] = 0.0
    set_init(m, mm[0].input[1], w1)
    bias = next(n for n in m.graph.node if n.op_type == "Add" and mm[0].output[0] in n.input)
    b = init(m, bias.input[1])
    b[2] *= 1000.0
    b[3] = -1.0
    set_init(m, bias.input[1], b)
    after = score_groups([grp], ctx_for(m, [grp], data=data), "entropy")[grp.id]
    raw_b, raw_a = before / before[:3].mean(), after / after[:3].mean()
    np.testing.assert_allclose(raw_a[:3], raw_b[:3], rtol=1e-6)
    assert after[3] == 0.0


def test_flatten_positions_are_summed_into_their_channel():
    g = GraphBuilder("x", [1, 2, 4, 4], seed=6, dynamic_batch=True)
    h = g.conv("x", 3, k=3)
    r = g.maxpool(g.relu(h))                                      # -> [N, 3, 2, 2]
    g.output(g.gemm(g.flatten(g.relu(g.conv(r, 3, k=1))), 5))
    m = g.build()
    conv2 = [n for n in m.graph.node if n.op_type == "Conv"][1]
    grp = chain_group(m, conv2.output[0])
    fl = next(mem for mem in grp.members if mem.kind == WEIGHT_IN)
    assert fl.op == "Gemm" and len(fl.index) == 12
    gemm_w = init(m, fl.tensor).astype(np.float64)               # [5, 12], transB
    want_in = np.abs(gemm_w).sum(axis=0).reshape(3, 4).sum(axis=1)
    w2 = init(m, conv2.input[1]).astype(np.float64)
    want_out = np.abs(w2).sum(axis=(1, 2, 3))
    got = score_groups([grp], ctx_for(m, [grp]), "l1", reduction="sum")[grp.id]
    np.testing.assert_allclose(got, want_in / want_in.mean() + want_out / want_out.mean(), rtol=1e-12)
    ctx = ctx_for(m, [grp], data=rand_data([1, 2, 4, 4], n=30))
    for crit in ("obs", "wanda", "lasso", "entropy", "fluctuation"):
        s = score_groups([grp], ctx, crit)[grp.id]
        assert s.shape == (3,) and np.all(np.isfinite(s)) and np.all(s >= 0), crit


def test_entropy_of_a_flattened_map_is_that_of_the_pooled_channel():
    g = GraphBuilder("x", [1, 2, 4, 4], seed=6, dynamic_batch=True)
    h = g.conv("x", 3, k=3)
    r = g.relu(h)
    g.output(g.gemm(g.flatten(r), 5))
    m = g.build()
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 2, 4, 4], n=64))
    assert any(mem.kind == WEIGHT_IN and len(mem.index) == 48 for mem in grp.members)
    got = CRITERIA["entropy"].members(grp, ctx)
    pooled = ctx.tensor_stats(r, 1, hist=True).entropy()             # per channel of the 4-D ReLU output
    assert len(got) == 1
    np.testing.assert_allclose(got[0], pooled, rtol=1e-12)


def test_combine_without_members_gives_zeros():
    np.testing.assert_array_equal(combine([], 3, "mean", "mean"), np.zeros(3))


# ---------------------------------------------------------------- through the analysis

ALL = list(CRITERIA)


def test_hand_groups_and_analyzed_groups_score_alike():
    from onnxprune.analysis import analyze
    m, h = conv_chain(dead=2)
    a = analyze(m)
    (grp,) = a.prunable
    hand = chain_group(m, h)
    data = rand_data([1, 3, 8, 8], n=20)
    ctx_a, ctx_h = ScoreContext(m, a, data=data), ctx_for(m, [hand], data=data)
    for crit in ALL:
        if crit == "bn-scale":
            continue
        sa, sh = score_groups([grp], ctx_a, crit)[grp.id], score_groups([hand], ctx_h, crit)[hand.id]
        np.testing.assert_allclose(sa, sh, rtol=1e-9, err_msg=crit)
        if requires_data(crit):
            assert int(np.argmin(sa)) == 2, crit


def test_every_criterion_on_an_analyzed_residual_net_in_one_pass():
    from onnxprune.analysis import analyze
    g = GraphBuilder("x", [1, 3, 8, 8], seed=3, dynamic_batch=True)
    r = g.relu(g.bn(g.conv("x", 6, k=3)))
    r = g.relu(g.add(g.bn(g.conv(g.relu(g.bn(g.conv(r, 4, k=3))), 6, k=3)), r))
    g.output(g.gemm(g.flatten(g.gap(r)), 3))
    m = g.build()
    a = analyze(m)
    groups = a.prunable
    assert len(groups) == 2
    data = rand_data([1, 3, 8, 8], n=16)
    for crit in ALL:
        ctx = ScoreContext(m, a, data=data if requires_data(crit) else None, batch_size=8)
        scores = score_groups(groups, ctx, crit, reduction="max")
        for grp in groups:
            s = scores[grp.id]
            assert s.shape == (grp.size,) and s.dtype == np.float64 and np.all(np.isfinite(s)), crit
        if requires_data(crit):
            st = ctx.stats()
            assert st.passes == 1 and st.samples == 16 and st.source == "npz", crit


def test_matmul_weight_on_the_left_is_a_consumer():
    from onnxprune.analysis import analyze
    g = GraphBuilder("x", [1, 8, 5], seed=2, dynamic_batch=True)
    w1, w2 = g.weight([6, 8]), g.weight([4, 6])
    h = g.op("MatMul", [w1, "x"])                                   # [N, 6, 5]: channels on axis 1
    r = g.relu(h)
    g.output(g.op("MatMul", [w2, r]))
    m = g.build()
    a = analyze(m)
    (grp,) = a.prunable
    data = rand_data([1, 8, 5], n=12)
    ctx = ScoreContext(m, a, data=data)
    hidden = _tensor(m, r, data)                                    # [12, 6, 5]
    w = init(m, w2).astype(np.float64)
    want = np.abs(w).sum(axis=0) * np.sqrt((hidden ** 2).sum(axis=(0, 2)))
    np.testing.assert_allclose(CRITERIA["wanda"].members(grp, ctx)[0], want, rtol=1e-6)
    assert np.all(np.isfinite(score_groups([grp], ctx, "obs")[grp.id]))


@pytest.mark.parametrize("rows", [40, 3])
def test_lasso_homotopy_satisfies_the_optimality_conditions_along_the_path(rows):
    from onnxprune.importance.second_order import lasso_homotopy
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 8)) * rng.uniform(0.2, 2.0, 8)
    g = a.T @ a
    b = g.sum(axis=1)
    path = list(lasso_homotopy(g))
    lams = [lam for lam, _ in path]
    assert lams[0] == pytest.approx(np.abs(b).max()) and not path[0][1].any()
    assert all(x >= y for x, y in zip(lams, lams[1:]))
    for lam, beta in path:
        corr = b - g @ beta
        tol = 1e-7 * lams[0]
        assert np.abs(corr).max() <= lam + tol
        on = beta != 0
        np.testing.assert_allclose(corr[on], lam * np.sign(beta[on]), atol=tol)
    if rows > 8:                                   # full rank: at λ = 0 the plain least squares answer, β = 1
        assert lams[-1] == pytest.approx(0.0, abs=1e-9)
        np.testing.assert_allclose(path[-1][1], np.ones(8), atol=1e-6)


def test_constants_behind_identity_and_constant_nodes_are_values():
    g = GraphBuilder("x", [1, 3, 4, 4], seed=1, dynamic_batch=True)
    w = g.weight([2, 3, 1, 1])
    wid = g.op("Identity", [w])                                      # torch dedups equal initializers so
    c = g.op("Constant", [], value=numpy_helper.from_array(np.full(2, 0.5, np.float32), "cv"))
    g.output(g.op("Conv", ["x", wid, c], kernel_shape=[1, 1]))
    m = g.build()
    ctx = ctx_for(m, [])
    np.testing.assert_array_equal(ctx.value(wid), init(m, w))
    np.testing.assert_array_equal(ctx.value(c), np.full(2, 0.5, np.float32))
    assert ctx.is_constant(wid) and not ctx.is_constant("x")
    with pytest.raises(KeyError):
        ctx.value("x")
