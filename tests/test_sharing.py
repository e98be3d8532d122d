"""Weight sharing: k-means codebooks, the in-graph decoder in onnxruntime, folding, CLI."""

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder

from onnxprune.data import load_npz
from onnxprune import ir, runtime
from onnxprune.compress import sharing
from onnxprune.measure import quality
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError
from onnxprune.compress.sharing import ShareOptions


def cnn(opset=17, cin=8):
    g = GraphBuilder("x", [2, cin, 8, 8], dynamic_batch=True, opset=opset)
    y = g.relu(g.bn(g.conv("x", 32, k=3)))
    y = g.gemm(g.flatten(g.gap(g.relu(g.conv(y, 32, k=3)))), 64)
    g.output(g.matmul(g.relu(y), 10))
    return g.build()


def inits(proto):
    return {t.name: ir.tensor_to_array(t) for t in proto.graph.initializer}


def decode(shared):
    """Dense weights rebuilt in numpy from the stored codebooks and (packed) indices."""
    arrays = inits(shared)
    out = {}
    for name, cb in arrays.items():
        if not name.endswith(".codebook"):
            continue
        tensor = name[: -len(".codebook")]
        if f"{tensor}.packed" in arrays:
            p = arrays[f"{tensor}.packed"].ravel()
            idx = np.stack([p >> 4, p & 15], axis=1).reshape(arrays[f"{tensor}.shape"])
        else:
            idx = arrays[f"{tensor}.indices"]
        out[tensor] = cb[idx.astype(np.int64)]
    return out


def with_weights(proto, arrays):
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for t in m.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(onnx.numpy_helper.from_array(arrays[t.name], t.name))
    return m


def run(proto, x):
    (y,) = runtime.run(runtime.session(proto), {"x": x}).values()
    return y


X = np.random.default_rng(3).standard_normal((4, 8, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------- k-means

def test_kmeans_recovers_separated_clusters_and_is_deterministic():
    rng = np.random.default_rng(0)
    centers = np.array([-3.0, -1.0, 0.5, 2.0, 7.0])
    labels = rng.integers(0, 5, 5000)
    values = centers[labels] + rng.uniform(-0.1, 0.1, 5000)
    c, idx = sharing.kmeans_1d(values, 5, seed=1)
    np.testing.assert_array_equal(idx, labels)  # centres sorted, so labels line up
    np.testing.assert_allclose(c, [values[labels == k].mean() for k in range(5)])
    c2, idx2 = sharing.kmeans_1d(values, 5, seed=1)
    np.testing.assert_array_equal(c, c2)
    np.testing.assert_array_equal(idx, idx2)
    assert idx.dtype == np.uint8


def test_more_clusters_fit_better():
    w = np.random.default_rng(0).standard_normal(4096)
    errs = []
    for k in (2, 16, 256):
        c, idx = sharing.kmeans_1d(w, k)
        assert len(np.unique(idx)) == k
        errs.append(np.linalg.norm(c[idx] - w) / np.linalg.norm(w))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01


# ---------------------------------------------------------------- the shared graph

@pytest.mark.parametrize("clusters,pack,bits", [(16, True, 4), (16, False, 8), (5, True, 4), (256, True, 8)])
def test_shared_model_runs_smaller_and_equals_dense_rebuild(tmp_path, clusters, pack, bits):
    m = cnn()
    res = sharing.share(m, ShareOptions(clusters=clusters, pack=pack))
    ir.check(res.proto, full=True)
    assert {lr.bits for lr in res.layers} == {bits}
    assert {lr.op for lr in res.layers} == {"Conv", "Gemm", "MatMul"}
    dense_size, shared_size = ir.save(m, tmp_path / "d.onnx"), ir.save(res.proto, tmp_path / "s.onnx")
    assert shared_size < dense_size * (0.25 if bits == 4 else 0.45)
    rebuilt = decode(onnx.load(tmp_path / "s.onnx"))
    assert set(rebuilt) == {lr.tensor for lr in res.layers}
    for t, w in rebuilt.items():
        assert len(np.unique(w)) <= clusters and w.shape == inits(m)[t].shape
    dense = with_weights(m, rebuilt)
    np.testing.assert_allclose(run(onnx.load(tmp_path / "s.onnx"), X), run(dense, X), rtol=0, atol=1e-6)
    assert not np.allclose(run(m, X), run(dense, X), atol=1e-6)  # sharing did change the weights


def test_fold_writes_the_same_weights_densely():
    m = cnn()
    opts = ShareOptions(clusters=16)
    shared, folded = sharing.share(m, opts), sharing.share(m, ShareOptions(clusters=16, fold=True))
    assert [n.op_type for n in folded.proto.graph.node] == [n.op_type for n in m.graph.node]
    for t, w in decode(shared.proto).items():
        np.testing.assert_array_equal(inits(folded.proto)[t], w)
    np.testing.assert_allclose(run(folded.proto, X), run(shared.proto, X), rtol=0, atol=1e-6)


def test_weight_error_matches_rebuilt_tensor():
    m = cnn()
    res = sharing.share(m, ShareOptions(clusters=16))
    rebuilt, orig = decode(res.proto), inits(m)
    for lr in res.layers:
        w = orig[lr.tensor]
        assert lr.weight_error == pytest.approx(np.linalg.norm(rebuilt[lr.tensor] - w) / np.linalg.norm(w), rel=1e-5)
        assert lr.bytes_after < lr.bytes_before == w.nbytes


def test_tensor_read_by_two_layers_gets_one_codebook():
    g = GraphBuilder("x", [2, 32])
    w = g.weight([32, 32])
    y = g.op("MatMul", [g.relu(g.op("MatMul", ["x", w])), w])
    g.output(y)
    m = g.build()
    res = sharing.share(m, ShareOptions(clusters=8))
    assert len(res.layers) == 1
    assert sum(n.op_type == "Gather" for n in res.proto.graph.node) == 1
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    dense = with_weights(m, decode(res.proto))
    (a,), (b,) = runtime.run(runtime.session(res.proto), {"x": x}).values(), \
        runtime.run(runtime.session(dense), {"x": x}).values()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_old_opset_and_odd_sizes_use_one_byte_indices():
    res = sharing.share(cnn(opset=10), ShareOptions(clusters=16))  # no BitShift before opset 11
    assert {lr.bits for lr in res.layers} == {8}
    ir.check(res.proto)
    g = GraphBuilder("x", [2, 15])
    g.output(g.gemm("x", 13))  # 195 weights: odd, cannot pack pairs
    res = sharing.share(g.build(), ShareOptions(clusters=4))
    assert [lr.bits for lr in res.layers] == [8]


def test_small_and_ignored_tensors_are_left_dense():
    m = cnn()
    gemm = next(n for n in m.graph.node if n.op_type == "Gemm")
    res = sharing.share(m, ShareOptions(clusters=16, min_size=1000, ignore=(gemm.name,)))
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    assert reasons[gemm.name] == "ignored" and any("< min size 1000" in r for r in reasons.values())
    assert [lr.op for lr in res.layers] == ["Conv", "Conv"]
    for name, w in inits(m).items():  # biases and BN kept as they were
        if name not in {lr.tensor for lr in res.layers} and name in inits(res.proto):
            np.testing.assert_array_equal(inits(res.proto)[name], w)


@pytest.mark.parametrize("k", [1, 0, 257, -3])
def test_bad_cluster_counts(k):
    with pytest.raises(OnnxPruneError, match="--clusters"):
        ShareOptions(clusters=k)


# ---------------------------------------------------------------- CLI

def test_cli_share_report(cli, tmp_path):
    src = tmp_path / "m.onnx"
    ir.save(cnn(), src)
    out, rep = tmp_path / "s.onnx", tmp_path / "s.json"
    res = cli("share", src, "-o", out, "--clusters", "16", "--json", rep, check=0)
    assert "weight sharing, K = 16" in res.out and "fidelity of" in res.out
    r = json.loads(rep.read_text())
    assert {"clusters", "layers", "file_bytes_before", "file_bytes_after", "fidelity"} <= set(r)
    assert r["clusters"] == 16 and r["file_bytes_after"] < r["file_bytes_before"] / 3
    assert r["file_bytes_after"] == out.stat().st_size
    (fid,) = r["fidelity"].values()
    assert 0 < fid["rel_error"] < 0.5
    assert {"name", "tensor", "shape", "clusters", "bits", "weight_error"} <= set(r["layers"][0])


def test_cli_share_bad_clusters_is_one_line(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    ir.save(cnn(), src)
    assert main(["share", str(src), "-o", str(tmp_path / "o.onnx"), "--clusters", "1"]) == 2
    err = capsys.readouterr().err
    assert "--clusters" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_shipped_model_shared_at_256_keeps_accuracy(fmnist_model, tmp_path):
    model = ir.load(fmnist_model)
    test = load_npz(fmnist_model.parent / "fmnist_test.npz", model.proto).split(500)[0]
    res = sharing.share(model.proto, ShareOptions(clusters=256))
    size = ir.save(res.proto, tmp_path / "s.onnx")
    assert size < 0.3 * model.file_bytes
    dense, shared = quality.accuracy(model, test)["top1"], quality.accuracy(res.proto, test)["top1"]
    assert shared >= dense - 0.01, (dense, shared)
