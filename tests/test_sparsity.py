"""Unstructured and N:M sparsity on small real graphs: exact patterns, criteria, compensation, CLI."""

import gzip
import json
import math

import numpy as np
import onnx
import pytest
from builders import GraphBuilder

from onnxprune import ir, runtime
from onnxprune.compress import sparsity
from onnxprune.cli import main
from onnxprune.data import ArrayData
from onnxprune.errors import OnnxPruneError
from onnxprune.compress.sparsity import Options, Pattern


def weights(proto):
    return {t.name: ir.tensor_to_array(t) for t in proto.graph.initializer}


def small_cnn(cin=8):
    """conv(cin->16) -> grouped conv(16->16, g=2) -> GAP -> Gemm(16->32) -> MatMul(32->8)."""
    g = GraphBuilder("x", [4, cin, 8, 8], dynamic_batch=True)
    y = g.relu(g.bn(g.conv("x", 16, k=3)))
    y = g.relu(g.conv(y, 16, k=3, group=2))
    y = g.gemm(g.flatten(g.gap(y)), 32)
    g.output(g.matmul(g.relu(y), 8))
    return g.build()


def correlated(shape, n, seed=0):
    """Samples whose features are strongly correlated (low rank plus noise; images also smooth), so
    second-order information matters, as it does for real activations."""
    rng = np.random.default_rng(seed)
    c = shape[0]
    r = max(2, c // 3)
    z = rng.standard_normal((n, r, *shape[1:]))
    if len(shape) == 3:  # neighbouring pixels correlate
        z = (z + np.roll(z, 1, 2) + np.roll(z, 1, 3) + np.roll(z, (1, 1), (2, 3))) / 2
    x = np.einsum("nr...,rc->nc...", z, rng.standard_normal((r, c))) + 0.1 * rng.standard_normal((n, *shape))
    return x.astype(np.float32)


# ---------------------------------------------------------------- exact patterns

def test_magnitude_zeros_exact_count_of_smallest_per_layer():
    m = small_cnn()
    res = sparsity.sparsify(m, Options(sparsity=0.7))
    before, after = weights(m), weights(res.proto)
    assert len(res.layers) == 4
    for lr in res.layers:
        w, new = before[lr.tensor], after[lr.tensor]
        assert lr.pruned == math.floor(0.7 * w.size + 0.5) == int((new == 0).sum())
        kept = new != 0
        assert np.abs(w[~kept]).max() <= np.abs(w[kept]).min()
        np.testing.assert_array_equal(new[kept], w[kept])
    touched = {lr.tensor for lr in res.layers}
    for name, w in before.items():  # biases, BN parameters, shapes untouched
        if name not in touched:
            np.testing.assert_array_equal(after[name], w)


def test_global_magnitude_one_threshold_across_layers():
    m = small_cnn()
    res = sparsity.sparsify(m, Options(sparsity=0.6, global_scope=True))
    before, after = weights(m), weights(res.proto)
    pruned = np.concatenate([np.abs(before[lr.tensor][after[lr.tensor] == 0]) for lr in res.layers])
    kept = np.concatenate([np.abs(before[lr.tensor][after[lr.tensor] != 0]) for lr in res.layers])
    total = sum(lr.numel for lr in res.layers)
    assert len(pruned) == math.floor(0.6 * total + 0.5)
    assert pruned.max() <= kept.min()
    assert len({round(lr.sparsity, 3) for lr in res.layers}) > 1  # per-layer sparsity varies


def nm_block_zeros(w, op, m, trans_b=1):
    """Zeros per N:M block computed straight from the ONNX tensor (blocks along the input axis)."""
    if op == "Conv":  # W[O, I, kh, kw]: M consecutive input channels at one kernel position
        o, i = w.shape[:2]
        blocks = w.reshape(o, i // m, m, *w.shape[2:])
        return (blocks == 0).sum(axis=2)
    k_axis = 1 if (op == "Gemm" and trans_b) else 0
    wk = np.moveaxis(w, k_axis, -1)
    return (wk.reshape(*wk.shape[:-1], -1, m) == 0).sum(axis=-1)


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
def test_nm_pattern_holds_in_every_block(criterion, pattern):
    m = small_cnn()
    pat = Pattern.parse(pattern)
    data = ArrayData({"x": correlated([8, 8, 8], 16)[:, :, :, :]})
    res = sparsity.sparsify(m, Options(pattern=pat, criterion=criterion, blocksize=6), data)
    after = weights(res.proto)
    ops = {lr.tensor: lr.op for lr in res.layers}
    assert set(ops.values()) == {"Conv", "Gemm", "MatMul"}
    for lr in res.layers:
        zeros = nm_block_zeros(after[lr.tensor], lr.op, pat.m)
        assert (zeros == pat.m - pat.n).all(), (lr.tensor, np.unique(zeros))
        assert lr.sparsity == pytest.approx(pat.sparsity)


def test_nm_along_k_for_gemm_without_transb():
    g = GraphBuilder("x", [4, 16])
    g.output(g.gemm("x", 12, trans_b=0))
    m = g.build()
    res = sparsity.sparsify(m, Options(pattern=Pattern(2, 4)))
    w = weights(res.proto)[res.layers[0].tensor]
    assert w.shape == (16, 12)
    assert (nm_block_zeros(w, "Gemm", 4, trans_b=0) == 2).all()
    assert not (nm_block_zeros(w.T, "Gemm", 4, trans_b=0) == 2).all()  # not along N


def test_nm_skips_layers_whose_input_channels_do_not_divide():
    m = small_cnn(cin=3)  # first conv: 3 input channels
    res = sparsity.sparsify(m, Options(pattern=Pattern(2, 4), min_size=0))
    skipped = {s["name"]: s["reason"] for s in res.skipped}
    first = [n for n in m.graph.node if n.op_type == "Conv"][0]
    assert "not a multiple of 4" in skipped[first.name]
    np.testing.assert_array_equal(weights(res.proto)[first.input[1]], weights(m)[first.input[1]])


def test_min_size_and_ignore_skip_layers():
    m = small_cnn()
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    res = sparsity.sparsify(m, Options(sparsity=0.5, ignore=(gemm.name,), min_size=600))
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert reasons[gemm.name] == "ignored"
    matmul = next(n for n in m.graph.node if n.op_type == "MatMul")
    assert "< min size 600" in reasons[matmul.name]  # 32x8 = 256 weights
    assert {lr.op for lr in res.layers} == {"Conv"}


def test_shared_weight_gets_one_magnitude_mask():
    g = GraphBuilder("x", [4, 16])
    w = g.weight([16, 16])
    a = g.op("MatMul", ["x", w])
    b = g.op("MatMul", [g.relu(a), w])
    g.output(b)
    m = g.build()
    data = ArrayData({"x": correlated([16], 32)})
    res = sparsity.sparsify(m, Options(sparsity=0.5, criterion="sparsegpt"), data)
    (lr,) = res.layers
    assert lr.criterion == "magnitude" and "shared by 2 layers" in lr.note
    assert int((weights(res.proto)[w] == 0).sum()) == 128


# ---------------------------------------------------------------- calibrated criteria

def test_wanda_keeps_small_weights_on_loud_inputs():
    g = GraphBuilder("x", [4, 8])
    g.output(g.gemm("x", 4, bias=False))
    m = g.build()
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32)
    x[:, 0] *= 1000.0  # feature 0 dominates every output
    res = sparsity.sparsify(m, Options(sparsity=0.5, criterion="wanda", min_size=0), ArrayData({"x": x}))
    w = weights(res.proto)[res.layers[0].tensor]  # [4, 8], rows are outputs
    assert (w[:, 0] != 0).all()
    assert ((w == 0).sum(axis=1) == 4).all()  # per output row
    mag = weights(sparsity.sparsify(m, Options(sparsity=0.5, min_size=0)).proto)[res.layers[0].tensor]
    assert not np.array_equal(mag == 0, w == 0)


def single_layer(kind):
    """One bias-free layer, so its output error is exactly ||X dW^T|| / ||X W^T||."""
    if kind == "conv":
        g = GraphBuilder("x", [4, 8, 6, 6], dynamic_batch=True)
        g.output(g.conv("x", 16, k=3, group=2, bias=False))
        return g.build(), [8, 6, 6]
    g = GraphBuilder("x", [4, 24], dynamic_batch=True)
    y = {"gemm": lambda: g.gemm("x", 16, bias=False), "gemm_t0": lambda: g.gemm("x", 16, trans_b=0, bias=False),
         "matmul": lambda: g.matmul("x", 16, bias=False)}[kind]()
    g.output(y)
    return g.build(), [24]


def output_error(reference, candidate, x):
    (a,) = runtime.run(runtime.session(reference), {"x": x}).values()
    (b,) = runtime.run(runtime.session(candidate), {"x": x}).values()
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


@pytest.mark.parametrize("kind", ["gemm", "gemm_t0", "matmul", "conv"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": Pattern(2, 4)}])
def test_sparsegpt_compensation_beats_magnitude_on_layer_output(kind, target):
    m, shape = single_layer(kind)
    x = correlated(shape, 96)
    data = ArrayData({"x": x})
    results = {c: sparsity.sparsify(m, Options(criterion=c, **target), data) for c in ("magnitude", "sparsegpt")}
    errs = {c: output_error(m, r.proto, x) for c, r in results.items()}
    assert errs["sparsegpt"] < 0.7 * errs["magnitude"], errs
    lr = results["sparsegpt"].layers[0]
    assert lr.output_error == pytest.approx(errs["sparsegpt"], rel=1e-3)  # the Gram estimate is the real error
    if "sparsity" in target:
        assert lr.pruned == math.floor(target["sparsity"] * lr.numel + 0.5) == int(
            (weights(results["sparsegpt"].proto)[lr.tensor] == 0).sum())


def test_sparsegpt_at_zero_sparsity_changes_nothing():
    m, shape = single_layer("conv")
    res = sparsity.sparsify(m, Options(sparsity=0.0, criterion="sparsegpt"), ArrayData({"x": correlated(shape, 8)}))
    for name, w in weights(m).items():
        np.testing.assert_allclose(weights(res.proto)[name], w, atol=1e-6)


def test_sequential_calibration_runs_in_waves():
    g = GraphBuilder("x", [2, 8, 6, 6], dynamic_batch=True)
    a = g.relu(g.conv("x", 8, k=3))
    left, right = g.conv(a, 8, k=3), g.conv(a, 8, k=1)  # read the same input: one wave
    g.output(g.conv(g.relu(g.add(left, right)), 8, k=3))
    m = g.build()
    sites, _ = sparsity.find_sites(m, min_size=0)
    assert [len(w) for w in sparsity.waves(m, sites)] == [1, 2, 1]
    data = ArrayData({"x": correlated([8, 6, 6], 8)})
    assert sparsity.sparsify(m, Options(sparsity=0.5, criterion="wanda", min_size=0), data).passes == 3
    assert sparsity.sparsify(m, Options(sparsity=0.5, criterion="wanda", min_size=0, sequential=False),
                             data).passes == 1


def test_fixed_batch_model_calibrates_one_batch_at_a_time():
    g = GraphBuilder("x", [1, 24])
    g.output(g.gemm("x", 16))
    m = g.build()
    res = sparsity.sparsify(m, Options(sparsity=0.5, criterion="sparsegpt", calib_samples=10),
                            ArrayData({"x": correlated([24], 12)}))
    assert res.passes == 1 and res.layers[0].pruned == 192


# ---------------------------------------------------------------- bad options

@pytest.mark.parametrize("kw", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(sparsity=float("nan")), dict(),
                                dict(sparsity=0.5, pattern=Pattern(2, 4), global_scope=True),
                                dict(sparsity=0.5, criterion="wanda", global_scope=True),
                                dict(sparsity=0.3, pattern=Pattern(2, 4)), dict(sparsity=0.5, criterion="obs")])
def test_bad_options_are_user_errors(kw):
    with pytest.raises(OnnxPruneError):
        Options(**kw)


@pytest.mark.parametrize("spec", ["5:4", "0:4", "4:4", "2-4", "", "a:b"])
def test_bad_patterns(spec):
    with pytest.raises(OnnxPruneError, match="--pattern"):
        Pattern.parse(spec)


def test_calibrated_criterion_needs_data():
    with pytest.raises(OnnxPruneError, match="--calib"):
        sparsity.sparsify(small_cnn(), Options(sparsity=0.5, criterion="wanda"))


# ---------------------------------------------------------------- storage and CLI

def test_gzip_compressed_size_matches_gzip(tmp_path):
    m = small_cnn()
    p = tmp_path / "m.onnx"
    ir.save(m, p)
    assert sparsity.compressed_size(p, "gzip") == len(gzip.compress(p.read_bytes(), compresslevel=9, mtime=0))


@pytest.fixture
def model_and_calib(tmp_path):
    m = small_cnn()
    p = tmp_path / "m.onnx"
    ir.save(m, p)
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, x=correlated([8, 8, 8], 24), labels=rng.integers(0, 8, 24))
    return p, calib


def test_cli_sparsify_report(cli, model_and_calib, tmp_path):
    model, calib = model_and_calib
    original = model.read_bytes()
    out, rep = tmp_path / "s.onnx", tmp_path / "s.json"
    res = cli("sparsify", model, "-o", out, "--pattern", "2:4", "--criterion", "sparsegpt", "--calib", calib,
              "--json", rep, check=0)
    assert "output err" in res.out and "compressed (" in res.out
    r = json.loads(rep.read_text())
    assert {"sparsity", "pattern", "criterion", "layers", "file_bytes_before", "file_bytes_after",
            "compressed_bytes_before", "compressed_bytes_after", "compression", "fidelity"} <= set(r)
    assert r["pattern"] == "2:4" and r["sparsity"] == 0.5 and r["compression"] in ("zstd", "gzip")
    assert {"name", "tensor", "shape", "sparsity"} <= set(r["layers"][0])
    assert all(lr["sparsity"] == 0.5 for lr in r["layers"])
    assert r["compressed_bytes_after"] < r["compressed_bytes_before"]
    assert r["accuracy"] is not None and r["reference_accuracy"] is not None  # calib data has labels
    (fid,) = r["fidelity"].values()
    assert 0 < fid["rel_error"] < 1
    assert model.read_bytes() == original
    onnx.checker.check_model(onnx.load(out), full_check=True)


@pytest.mark.parametrize("args,msg", [
    (["--sparsity", "1.0"], "--sparsity"), (["--sparsity", "nan"], "--sparsity"),
    (["--sparsity", "-0.2"], "--sparsity"), (["--pattern", "5:4"], "--pattern"),
    (["--sparsity", "0.5", "--criterion", "wanda"], "--calib"), ([], "--sparsity"),
    (["--sparsity", "0.5", "--global", "--criterion", "sparsegpt", "--calib", "random"], "--global"),
])
def test_cli_bad_arguments_are_one_line_errors(model_and_calib, tmp_path, capsys, args, msg):
    model, _ = model_and_calib
    assert main(["sparsify", str(model), "-o", str(tmp_path / "o.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_cli_bad_arguments_exit_2_in_a_real_process(cli, model_and_calib, tmp_path):
    model, _ = model_and_calib
    for args, msg in ((["--sparsity", "1.0"], "--sparsity"), (["--sparsity", "0.5", "--criterion", "nope"],
                                                              "invalid choice")):
        res = cli("sparsify", model, "-o", tmp_path / "o.onnx", *args)
        assert res.code == 2 and msg in res.err and "Traceback" not in res.err, res
        assert len(res.err.strip().splitlines()) == 1


def test_cli_checks_output_path_before_working(model_and_calib, tmp_path, capsys):
    model, _ = model_and_calib
    assert main(["sparsify", str(model), "-o", str(tmp_path / "missing" / "o.onnx"), "--sparsity", "0.5"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["share", str(model), "-o", str(model)]) == 2
    assert "is the input model" in capsys.readouterr().err
