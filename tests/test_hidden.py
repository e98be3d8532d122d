"""Hidden width: norms recognised in every spelling, the stream found, rotation exact, slicing by PCA."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxprune import hidden
from onnxprune.errors import OnnxPruneError
from onnxprune.hidden import norms as norms_mod, slicing
from onnxprune.measure import counts
from onnxprune.testing import transformer

DECODERS = {
    "gpt2-like": dict(norm="layer", positions=True),
    "gpt2-primitives-untied": dict(norm="layer", spelled="primitives", positions=True, tied=False),
    "llama-primitives-gqa": dict(norm="rms", spelled="primitives", gated=True, kv_heads=2, bias=False),
    "llama-opset23": dict(norm="rms", gated=True, bias=False, opset=23),
    "layer-primitives-opset18": dict(norm="layer", spelled="primitives", opset=18),
    "llama-tied-copy": dict(norm="rms", spelled="primitives", gated=True, tied="copy"),
}


def logits(model, ids):
    return ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": ids})[0]


@pytest.mark.parametrize("kw", [dict(norm="layer"), dict(norm="layer", spelled="primitives"),
                                dict(norm="rms", spelled="primitives"), dict(norm="rms", opset=23),
                                dict(norm="layer", spelled="primitives", opset=18, eps=1e-12)])
def test_norms_recognised_in_every_spelling(kw):
    eps = kw.pop("eps", None)
    model = transformer.decoder(layers=1, **kw)
    if eps is not None:   # BERT's eps: the fit must find it
        for t in model.graph.initializer:
            if t.dims == [] and abs(numpy_helper.to_array(t) - 1e-5) < 1e-9:
                t.CopyFrom(numpy_helper.from_array(np.array(eps, np.float32), t.name))
    found = norms_mod.find_norms(model)
    assert len(found) == 3
    gammas = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("gamma")}
    for n in found:
        assert n.kind == kw["norm"]
        assert n.eps == pytest.approx(eps or 1e-5, rel=1e-3)
        assert any(np.allclose(n.scale, g, rtol=1e-5) for g in gammas.values())


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_rotation_alone_is_exact(name):
    model = transformer.decoder(**DECODERS[name])
    r = hidden.slice_hidden(model)          # random rotation, full width, verified inside
    assert r.rotation.passed and r.rotation.needed_rtol < 1e-5
    want = 32 if DECODERS[name]["norm"] == "rms" else 31   # a LayerNorm's all-ones direction goes
    assert r.width_after == want
    ids = np.random.default_rng(1).integers(0, 96, (3, 11))
    np.testing.assert_allclose(logits(r.proto, ids), logits(model, ids), rtol=0, atol=1e-4)


def test_no_stream_means_untouched(fmnist_model, cli, tmp_path):
    model = onnx.load(fmnist_model)
    assert not hidden.find_stream(model)
    with pytest.raises(OnnxPruneError, match="no residual stream"):
        hidden.slice_hidden(model)
    r = cli("prune", fmnist_model, "-o", tmp_path / "o.onnx", "--slice-hidden", "--calib",
            "models/fmnist_calib.npz", check=2)
    assert "no residual stream" in r.err and len(r.err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("spelled", ["op", "primitives"])
def test_post_norm_encoder_rotates_exactly_with_a_basis_per_segment(spelled):
    """BERT-like: each norm's output is the stream; a different random basis in every part between norms."""
    model = transformer.encoder(spelled=spelled)
    stream = hidden.find_stream(hidden.name_nodes(model))
    assert stream.segments == 5 and len(stream.norms) == 5
    assert sorted(u.kind for u in stream.uses) == ["stream"] * 4 and stream.outputs == [4]
    r = hidden.slice_hidden(model)
    assert r.rotation.passed and r.rotation.needed_rtol < 1e-5
    ids = np.random.default_rng(1).integers(0, 96, (2, 7))
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"input_ids": ids})[0]
    full = hidden.slice_hidden(model, verify=False, width=31)
    got = ort.InferenceSession(full.proto.SerializeToString()).run(None, {"input_ids": ids})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)   # the hidden state comes back in the original basis
    assert got.shape == want.shape == (2, 7, 32)


def low_rank_decoder(rank=6, **kw):
    """A decoder whose stream lives (almost) in a ``rank``-dimensional subspace: PCA must find it."""
    model = hidden.name_nodes(transformer.decoder(d=32, **kw))
    stream = hidden.find_stream(model)
    rng = np.random.default_rng(5)
    inits = {t.name: t for t in model.graph.initializer}
    for w in stream.writers:
        a = numpy_helper.to_array(inits[w.tensor])
        a = (rng.standard_normal((a.shape[0], rank)) @ rng.standard_normal((rank, a.shape[1]))) \
            if w.op == "Gather" else a * 0.003
        inits[w.tensor].CopyFrom(numpy_helper.from_array(a.astype(np.float32), w.tensor))
        head = next((t for t in inits if t.startswith("lm_head")), None)
        if w.op == "Gather" and head:   # the head stays an exact copy of the (new) table
            inits[head].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(a.T.astype(np.float32)), head))
    return model


@pytest.mark.parametrize("kw", [dict(norm="rms", spelled="primitives", gated=True), dict(norm="layer"),
                                dict(norm="rms", spelled="primitives", tied="copy")])
def test_pca_finds_the_used_directions_and_ties_stay_tied(kw):
    from onnxprune.data import ArrayData

    model = low_rank_decoder(**kw)
    rng = np.random.default_rng(0)
    calib = ArrayData({"input_ids": rng.integers(0, 96, (8, 16))})
    ids = rng.integers(0, 96, (4, 16))
    ref = logits(model, ids)
    pca = hidden.slice_hidden(model, calib, width=8)
    rand = hidden.slice_hidden(model, None, width=8)
    err = lambda m: np.abs(logits(m, ids) - ref).max() / np.abs(ref).max()   # noqa: E731
    assert pca.rotation.passed and pca.basis == "calibration" and pca.variance_kept > 0.99
    assert err(pca.proto) < 0.02 < 0.2 < err(rand.proto)
    # one table of [vocab, 8] serves the embedding Gather and the head
    inits = {t.name: list(t.dims) for t in pca.proto.graph.initializer}
    gather = next(n for n in pca.proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
                  and inits[n.input[0]][0] == 96)
    assert inits[gather.input[0]] == [96, 8]
    head_reads = {i for n in pca.proto.graph.node if n.op_type == "Transpose" for i in n.input}
    assert gather.input[0] in head_reads


def test_width_for_budget_matches_the_built_model():
    model = transformer.decoder(norm="rms", spelled="primitives", gated=True, d=64, ffn=128)
    width, fr = slicing.width_for_budget(model, params=0.8, round_to=8)
    built = hidden.slice_hidden(model, None, width=width, verify=False)
    got = counts.summarize(built.proto).params / counts.summarize(model).params
    assert got == pytest.approx(fr["params"], rel=1e-9) and got <= 0.8
    wider = hidden.slice_hidden(model, None, width=width + 8, verify=False)
    assert counts.summarize(wider.proto).params / counts.summarize(model).params > 0.8


def test_cli_slice_hidden_with_budget(cli, tmp_path):
    onnx.save(transformer.decoder(norm="rms", spelled="primitives", gated=True, d=64, ffn=128), tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 96, (8, 16)))
    np.savez(tmp_path / "held.npz", input_ids=rng.integers(0, 96, (8, 16)))
    cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "s.onnx", "--slice-hidden", "--target-params", "0.85",
        "--calib", tmp_path / "calib.npz", "--data", tmp_path / "held.npz", "--metric", "perplexity",
        "--bench-runs", "0", "--report", tmp_path / "r.json", check=0)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["params_after"] <= 0.85 * rep["params_before"]
    h = rep["hidden"]
    assert h["rotation_verified"] and h["width_before"] == 64 and h["width_after"] % 8 == 0
    assert h["basis"] == "calibration" and "approximate" in h["contract"]
    assert rep["validation"]["perplexity_after"]["tokens"] == 8 * 15
    sliced = onnx.load(tmp_path / "s.onnx")
    assert counts.summarize(sliced).params == rep["params_after"]


def test_refit_rebuilds_each_norm_output_at_least_as_well_as_the_exact_fold():
    from onnxprune.data.readers import ArrayData
    from onnxprune.hidden import rotate

    model = slicing.drop_noop_casts(hidden.name_nodes(transformer.decoder(norm="layer", d=32, layers=1)))
    stream = hidden.find_stream(model)
    calib = ArrayData({"input_ids": np.random.default_rng(0).integers(0, 96, (16, 16))})
    Q, _ = slicing.pca_basis(slicing.covariance(model, stream, calib)[0], stream.kind)
    names = {}
    sliced = rotate.apply(model, stream, Q[:, :12], rms_names=names)
    fits = slicing.refit(model, stream, sliced, names, calib, ridge=0.0)
    outs = []
    for m, ts in ((model, [n.y for n in stream.norms]), (sliced, [names[i] for i in range(len(stream.norms))])):
        sess = ort.InferenceSession(_with_outputs(m, ts).SerializeToString())
        outs.append(sess.run(ts, {"input_ids": calib.arrays["input_ids"]}))
    s = np.sqrt(32 / 12)
    for i, nm in enumerate(stream.norms):
        y = outs[0][i].reshape(-1, 32).astype(np.float64)
        r = outs[1][i].reshape(-1, 12).astype(np.float64)
        exact = r @ (s * Q[:, :12].T * nm.scale[None, :]) + nm.bias
        fitted = r @ fits[i][:12] + fits[i][12]
        assert np.linalg.norm(fitted - y) <= np.linalg.norm(exact - y) * (1 + 1e-9)


def _with_outputs(m, names):
    c = onnx.ModelProto()
    c.CopyFrom(m)
    for n in names:
        c.graph.output.add().name = n
    return c


def test_cli_slice_hidden_needs_real_data(cli, tmp_path):
    onnx.save(transformer.decoder(), tmp_path / "m.onnx")
    for extra in ([], ["--calib", "random", "--hidden-keep", "0.5"]):
        r = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--slice-hidden", *extra, check=2)
        assert "--calib" in r.err and len(r.err.strip().splitlines()) == 1
    r = cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--hidden-keep", "0.5", check=2)
    assert "--slice-hidden" in r.err
    assert not (tmp_path / "o.onnx").exists()
    # at full width random data checks the rotation: the saved model equals the original
    cli("prune", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--slice-hidden", "--calib", "random",
        "--report", tmp_path / "r.json", check=0)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["verified"] and rep["hidden"]["rotation_verified"] and rep["hidden"]["width_after"] == 31
    ids = np.random.default_rng(2).integers(0, 96, (2, 9))
    np.testing.assert_allclose(logits(onnx.load(tmp_path / "o.onnx"), ids), logits(transformer.decoder(), ids),
                               atol=1e-4)
