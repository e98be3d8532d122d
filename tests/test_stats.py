"""Calibration statistics: streamed sums equal the whole-data answers, one pass, bounded chunks."""

from __future__ import annotations

import numpy as np
import pytest
from builders import GraphBuilder
from test_importance import _tensor, chain_group, conv_chain, ctx_for, rand_data

from onnxprune.runtime import taps
from onnxprune.data import ArrayData, random_data
from onnxprune.importance import ScoreContext, score_groups, stats
from onnxprune.importance.stats import GramSpec, Needs, collect


class CountingData(ArrayData):
    """An ArrayData that counts how often it is streamed."""

    streamed = 0

    def batches(self, batch_size, limit=None):
        self.streamed += 1
        yield from super().batches(batch_size, limit)


def small_net():
    g = GraphBuilder("x", [1, 3, 6, 6], seed=1, dynamic_batch=True)
    h = g.conv("x", 4, k=3)
    r = g.relu(h)
    out = g.conv(r, 5, k=3, pad=1)
    g.output(out)
    return g.build(), h, r


def test_moments_match_numpy_on_the_whole_data():
    m, h, r = small_net()
    data = rand_data([1, 3, 6, 6], n=23)
    st = collect(m, Needs(moments={(h, 1), (r, 1), ("x", 1)}), data, batch_size=5)
    for name in (h, r, "x"):
        full = _tensor(m, name, data) if name != "x" else data.arrays["x"].astype(np.float64)
        per = np.moveaxis(full, 1, 0).reshape(full.shape[1], -1)
        t = st.tensor(name, 1)
        np.testing.assert_allclose(t.mean_abs, np.abs(per).mean(axis=1), rtol=1e-10)
        np.testing.assert_allclose(t.mean, per.mean(axis=1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(t.var, per.var(axis=1), rtol=1e-9)
        np.testing.assert_allclose(t.sumsq, (per ** 2).sum(axis=1), rtol=1e-10)
        np.testing.assert_allclose(t.nonpos_fraction, (per <= 0).mean(axis=1))
    assert st.samples == 23 and st.passes == 1 and st.source == "npz"


@pytest.mark.parametrize("stride,pad,group", [(1, 1, 1), (2, 0, 1), (1, 1, 2)])
def test_conv_gram_is_the_im2col_gram(stride, pad, group):
    m, h, r = small_net()
    data = rand_data([1, 3, 6, 6], n=9)
    conv = {"kernel_shape": [3, 3], "strides": [stride] * 2, "pads": [pad] * 4, "dilations": [1, 1],
            "group": group, "auto_pad": "NOTSET"}
    spec = GramSpec(r, 1, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in conv.items())))
    st = collect(m, Needs(grams={"k": spec}), data, batch_size=4)
    p = taps.conv_patches(_tensor(m, r, data), **conv)
    want = np.einsum("grd,gre->gde", p, p)
    np.testing.assert_allclose(st.grams["k"].gram, want, rtol=1e-10)
    assert st.grams["k"].rows == p.shape[1]


def test_dense_gram_and_channel_axis_not_last():
    m, h, r = small_net()
    data = rand_data([1, 3, 6, 6], n=7)
    st = collect(m, Needs(grams={"d": GramSpec(r, 1)}), data, batch_size=3)
    x = np.moveaxis(_tensor(m, r, data), 1, -1).reshape(-1, 4)
    np.testing.assert_allclose(st.grams["d"].gram[0], x.T @ x, rtol=1e-10)


def test_entropy_known_answers():
    # channel 0 constant, channel 1 a per-sample +-1, channel 2 spread out
    n = 40
    x = np.zeros((n, 3, 2, 2), dtype=np.float32)
    x[:, 0] = 0.5
    x[:, 1] = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None, None]
    x[:, 2] = np.linspace(-1, 1, n)[:, None, None]
    g = GraphBuilder("x", [1, 3, 2, 2], dynamic_batch=True)
    g.output(g.relu("x"))
    st = collect(g.build(), Needs(hist={("x", 1)}), ArrayData({"x": x}), batch_size=8, bins=16)
    e = st.tensor("x", 1).entropy()
    assert e[0] == 0.0
    assert e[1] == pytest.approx(np.log(2), abs=1e-12)
    assert e[2] > 1.5 * np.log(2)


def test_one_streaming_pass_for_many_groups_and_random_source():
    m, h, r = small_net()
    g = GraphBuilder("x", [1, 3, 6, 6], seed=1, dynamic_batch=True)
    a = g.relu(g.conv("x", 4, k=3))
    b = g.relu(g.conv(a, 4, k=3))
    g.output(g.conv(b, 2, k=1))
    m = g.build()
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    groups = [chain_group(m, convs[0].output[0], 0), chain_group(m, convs[1].output[0], 1)]
    src = random_data(m, {"x": [1, 3, 6, 6]}, num_samples=10)
    data = CountingData(src.arrays, kind="random", source="random")
    ctx = ctx_for(m, groups, data=data, batch_size=4)
    for crit in ("obs", "wanda", "entropy"):
        score_groups(groups, ctx, crit)
    # obs registered everything its groups need up front; the later criteria added one pass each
    assert data.streamed == 3
    ctx2 = ctx_for(m, groups, data=CountingData(src.arrays, kind="random"), batch_size=4)
    score_groups(groups, ctx2, "lasso")
    score_groups(groups, ctx2, "obs")                       # same Gram matrices: no new pass
    assert ctx2.data.streamed == 1
    assert ctx2.stats().source == "random"


def test_many_tensors_are_tapped_in_chunks_without_double_counting_inputs(monkeypatch):
    monkeypatch.setattr(stats, "MAX_OUTPUTS", 1)
    m, h, r = small_net()
    data = rand_data([1, 3, 6, 6], n=6)
    conv = (("auto_pad", "NOTSET"), ("dilations", (1, 1)), ("group", 1), ("kernel_shape", (3, 3)),
            ("pads", (1, 1, 1, 1)), ("strides", (1, 1)))
    needs = Needs(moments={(h, 1), (r, 1), ("x", 1)}, grams={"in": GramSpec("x", 1, conv)})
    st = collect(m, needs, data, batch_size=4)
    assert st.passes == 2 and st.samples == 6
    whole = collect(m, needs, data, batch_size=100)
    for key in needs.moments:
        np.testing.assert_allclose(st.tensors[key].sumsq, whole.tensors[key].sumsq, rtol=1e-10)
        assert st.tensors[key].count[0] == whole.tensors[key].count[0]
    np.testing.assert_allclose(st.grams["in"].gram, whole.grams["in"].gram, rtol=1e-10)


def test_limit_caps_the_samples():
    m, h = conv_chain()
    grp = chain_group(m, h)
    ctx = ctx_for(m, [grp], data=rand_data([1, 3, 8, 8], n=30), limit=7, batch_size=4)
    score_groups([grp], ctx, "act-mean")
    assert ctx.stats().samples == 7


def test_streaming_histogram_equals_a_histogram_on_its_final_grid():
    rng = np.random.default_rng(0)
    # batches that keep widening the range on both sides
    x = (rng.standard_normal((60, 2, 3)) * np.linspace(0.1, 5, 60)[:, None, None]).astype(np.float32)
    x[:, 1] += 3.0
    g = GraphBuilder("x", [1, 2, 3], dynamic_batch=True)
    g.output(g.relu("x"))
    st = collect(g.build(), Needs(hist={("x", 1)}), ArrayData({"x": x}), batch_size=7, bins=15)
    t = st.tensor("x", 1)
    fine = 16 * stats.HIST_OVERSAMPLE
    assert t.hist.shape == (2, fine) and t.hist.sum() == 120
    means = x.astype(np.float64).mean(axis=2)
    for p in range(2):
        edges = t.lo[p] + t.width[p] * np.arange(fine + 1)
        assert edges[0] <= means[:, p].min() and means[:, p].max() < edges[-1]
        want = np.bincount(np.floor((means[:, p] - t.lo[p]) / t.width[p]).astype(int), minlength=fine)
        # equal up to a sample lying within rounding of a bin edge (the grid moved while streaming)
        assert np.abs(np.cumsum(t.hist[p]) - np.cumsum(want)).max() <= 1


def test_entropy_bins_span_each_channels_own_range():
    # a channel whose range keeps growing after the first batch still gets all its bins (the old
    # streaming grid left it half of them); the result matches a histogram of all samples at once
    rng = np.random.default_rng(1)
    n = 400
    x = np.stack([rng.standard_normal(n) * np.linspace(0.05, 3, n), rng.random(n) * 4 - 1,
                  rng.exponential(1.0, n)], axis=1).astype(np.float32)
    g = GraphBuilder("x", [1, 3], dynamic_batch=True)
    g.output(g.relu("x"))
    t = collect(g.build(), Needs(hist={("x", 1)}), ArrayData({"x": x}), batch_size=16, bins=32).tensor("x", 1)
    hist = t.histogram()
    assert hist.shape == (3, 32) and np.allclose(hist.sum(axis=1), n)
    for p in range(3):
        want = np.histogram(x[:, p].astype(np.float64), bins=32, range=(x[:, p].min(), x[:, p].max()))[0]
        assert np.abs(np.cumsum(hist[p]) - np.cumsum(want)).max() <= 0.01 * n   # within a fine bin
        q = want[want > 0] / n
        assert t.entropy()[p] == pytest.approx(-(q * np.log(q)).sum(), abs=0.03)


def test_onnxruntime_failures_on_the_data_are_user_errors():
    from onnxprune.errors import OnnxPruneError
    g = GraphBuilder("x", [1, 3, 6, 6], seed=1, dynamic_batch=True)
    h = g.conv("x", 4, k=3, pad=0)
    g.output(g.relu(h))
    m = g.build()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"      # spatial size left to the data
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    tiny = ArrayData({"x": np.zeros((2, 3, 1, 1), np.float32)})       # smaller than the 3x3 kernel
    with pytest.raises(OnnxPruneError, match="onnxruntime failed on the calibration data"):
        collect(m, Needs(moments={(h, 1)}), tiny)


def test_fixed_batch_models_get_batches_of_their_size():
    g = GraphBuilder("x", [2, 3, 6, 6], seed=1)                        # batch fixed at 2
    h = g.conv("x", 4, k=3)
    g.output(g.relu(h))
    m = g.build()
    data = rand_data([1, 3, 6, 6], n=7)
    st = collect(m, Needs(moments={(h, 1)}), data, batch_size=32)
    assert st.samples == 6                                              # three full batches of 2
    from onnxprune.errors import OnnxPruneError
    with pytest.raises(OnnxPruneError, match="fixed at 2.*only 1 samples"):
        collect(m, Needs(moments={(h, 1)}), rand_data([1, 3, 6, 6], n=1))


def test_progress_wraps_the_calibration_pass_and_the_scoring():
    m, h = conv_chain()
    grp = chain_group(m, h)
    seen = []

    def progress(it, total, description):
        seen.append((description, total))
        yield from it

    ctx = ctx_for(m, [grp], data=rand_data([1, 3, 8, 8], n=10), batch_size=4, progress=progress)
    score_groups([grp], ctx, "wanda")
    assert seen == [("calibration statistics", 3), ("scoring (wanda)", 1)]


def test_gram_rows_are_sampled_per_sample_when_capped():
    m, h, r = small_net()
    data = rand_data([1, 3, 6, 6], n=40)
    conv = (("auto_pad", "NOTSET"), ("dilations", (1, 1)), ("group", 1), ("kernel_shape", (3, 3)),
            ("pads", (1, 1, 1, 1)), ("strides", (1, 1)))
    needs = Needs(grams={"c": GramSpec(r, 1, conv), "d": GramSpec(r, 1)})
    full = collect(m, needs, data, batch_size=16, gram_rows_per_sample=None)
    same = collect(m, needs, data, batch_size=16, gram_rows_per_sample=36)      # 6x6 positions: all of them
    capped = collect(m, needs, data, batch_size=16, gram_rows_per_sample=9)
    np.testing.assert_allclose(same.grams["c"].gram, full.grams["c"].gram, rtol=1e-12)
    assert full.grams["c"].rows == 40 * 36 and capped.grams["c"].rows == 40 * 9
    assert capped.grams["d"].rows == 40 * 9
    ratio = np.trace(capped.grams["c"].gram[0]) * 4 / np.trace(full.grams["c"].gram[0])
    assert 0.8 < ratio < 1.25
    again = collect(m, needs, data, batch_size=16, gram_rows_per_sample=9)
    np.testing.assert_array_equal(again.grams["c"].gram, capped.grams["c"].gram)   # seeded
    flat = ArrayData({"x": np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)})
    g = GraphBuilder("x", [1, 8], dynamic_batch=True)
    g.output(g.relu("x"))
    st = collect(g.build(), Needs(grams={"x": GramSpec("x", 1)}), flat, gram_rows_per_sample=1)
    assert st.grams["x"].rows == 10                                            # one row per sample: all kept
