"""The >2 GB code paths on a small model: external data in and out, checks on the skeleton, the masked
reference sharing the original's weights, sessions written with external data. The real 2.4 GB run is
``tools/bench_large_model.py`` (results in docs/reliability.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import ir, pipeline, runtime, verify
from onnxprune.plan import Policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_large_model as bench  # noqa: E402

LAYERS, WIDTH = 3, 64


@pytest.fixture
def big_paths(monkeypatch):
    """Every 'too large' threshold at a few KB, so a 50 KB model takes the paths of a 2 GB one."""
    monkeypatch.setattr(ir.limits, "TWO_GB", 4096)
    monkeypatch.setattr(ir.limits, "CHECK_WEIGHTS_BYTES", 4096)
    monkeypatch.setattr(verify, "SHARE_WEIGHTS_BYTES", 4096)


def digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_large_model_paths_prune_verify_and_save_external(tmp_path, big_paths):
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    bench.generate(src, LAYERS, WIDTH)
    inputs = digests(src.parent)
    model = ir.load(src)
    assert model.external and ir.proto_bytes(model.proto) >= ir.TWO_GB
    weights = {t.name: onnx.numpy_helper.to_array(t).copy() for t in model.proto.graph.initializer}

    result = pipeline.prune(model, policy=Policy(ratio=0.5))
    out = tmp_path / "out" / "pruned.onnx"
    out.parent.mkdir()
    pipeline.save(result, out)

    assert result.verification.passed and result.report()["groups_pruned"] == LAYERS - 1
    # checking and verifying left the original's weights in memory untouched
    for t in model.proto.graph.initializer:
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name])
    assert digests(src.parent) == inputs
    assert sorted(p.name for p in out.parent.iterdir()) == ["pruned.onnx", "pruned.onnx.data"]
    info = bench.check_output(out, WIDTH)  # weights external, the small biases inline
    assert info["external_tensors"] == LAYERS and info["output_shape"] == [1, WIDTH] and info["finite"]
    header = onnx.load(str(out), load_external_data=False)
    dims = {t.name: list(t.dims) for t in header.graph.initializer}
    assert dims["w0"] == [WIDTH, WIDTH // 2] and dims["w1"] == [WIDTH // 2, WIDTH // 2]


def test_session_with_shared_weights_matches_the_full_model(tmp_path, big_paths):
    src = tmp_path / "m.onnx"
    bench.generate(src, 2, 96)  # 96 x 96 weights: above the skeleton's 4096-element cut
    model = ir.load(src).proto
    x = {"x": np.random.default_rng(0).standard_normal((1, 96), dtype=np.float32)}
    light = ir.skeleton(model)  # weights are graph inputs here; the session takes them from `model`
    assert not any(t.name.startswith("w") for t in light.graph.initializer)
    got = runtime.session(light, weights=model).run(None, x)[0]
    want = runtime.session(model).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # same weights; kernels may differ


def test_bench_markdown_section_is_replaced_in_place(tmp_path):
    doc = tmp_path / "r.md"
    doc.write_text(f"# t\n\nbefore\n\n{bench.BEGIN}\nold\n{bench.END}\n\nafter\n")
    bench.write_doc(f"{bench.BEGIN}\nnew\n{bench.END}", doc)
    assert doc.read_text() == f"# t\n\nbefore\n\n{bench.BEGIN}\nnew\n{bench.END}\n\nafter\n"


def test_lazy_load_keeps_weights_on_disk_and_prunes_the_same(tmp_path, monkeypatch):
    """``load(lazy=True)`` (what ``prune`` uses) leaves big external data on disk; the pruned model,
    its verification and the saved files are those of a model loaded with all its weights."""
    src = tmp_path / "in" / "big.onnx"
    src.parent.mkdir()
    bench.generate(src, LAYERS, WIDTH)
    inputs = digests(src.parent)
    eager = pipeline.prune(ir.load(src), policy=Policy(ratio=0.5))
    monkeypatch.setattr(ir.limits, "LAZY_BYTES", 0)
    lazy_model = ir.load(src, lazy=True)
    assert ir.is_lazy(lazy_model.proto) and not any(t.HasField("raw_data") for t in lazy_model.proto.graph.initializer)
    lazy = pipeline.prune(src, policy=Policy(ratio=0.5))
    assert ir.is_lazy(lazy.original.proto) and lazy.verification.passed
    assert lazy.verification.outputs[0].max_abs == eager.verification.outputs[0].max_abs
    for name, out in (("eager", eager), ("lazy", lazy)):
        (tmp_path / name).mkdir()
        pipeline.save(out, tmp_path / name / "p.onnx")
    a, b = (onnx.load(str(tmp_path / n / "p.onnx")) for n in ("eager", "lazy"))
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    for ta, tb in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(ta), onnx.numpy_helper.to_array(tb))
    assert digests(src.parent) == inputs
    w0 = ir.tensor_to_array(lazy_model.proto.graph.initializer[0])
    np.testing.assert_array_equal(w0, onnx.numpy_helper.to_array(ir.load(src).proto.graph.initializer[0]))
    teacher = ir.materialize(lazy_model).proto  # all weights in memory, as a fully loaded model
    assert not ir.is_lazy(teacher) and runtime.session(teacher).run(None, {"x": np.ones((1, WIDTH), np.float32)})


def test_verified_bytes_are_the_saved_bytes_and_file_bytes_track_the_proto(tmp_path):
    src = tmp_path / "m.onnx"
    bench.generate(src, 2, 32)
    model = ir.load(src)
    assert ir.file_bytes(model) == src.read_bytes() and ir.serialized(model) == model.proto.SerializeToString()
    small = tmp_path / "small.onnx"
    ir.save(model.proto, small)  # one file: the original's bytes are the reference's base
    m2 = ir.load(small)
    assert ir.serialized(m2) == small.read_bytes()
    result = pipeline.prune(m2, policy=Policy(ratio=0.5))
    out = tmp_path / "out.onnx"
    pipeline.save(result, out)
    assert result.proto_bytes() is not None and out.read_bytes() == result.proto_bytes()
    m2.proto.graph.node[0].name = "renamed"  # a changed proto no longer matches its file
    assert ir.file_bytes(m2) is None and onnx.load_from_string(ir.serialized(m2)).graph.node[0].name == "renamed"


def test_masked_reference_splice_zeroes_the_removed_positions(tmp_path):
    src = tmp_path / "m.onnx"
    bench.generate(src, 2, 16)
    model = ir.load(src).proto
    x = {"x": np.random.default_rng(0).standard_normal((1, 16), dtype=np.float32)}
    ref = verify.masked_reference(model, {"relu0": (1, np.array([1, 5]))}, {"relu0": [1, 16]})
    h = runtime.session(runtime.with_outputs(model, ["relu0"]), optimize=False).run(["relu0"], x)[0]
    h[:, [1, 5]] = 0
    w1, b1 = (onnx.numpy_helper.to_array(t) for t in model.graph.initializer[2:4])
    np.testing.assert_allclose(runtime.session(ref).run(None, x)[0], h @ w1 + b1, rtol=1e-5, atol=1e-5)
    assert len(ref.graph.initializer) == len(model.graph.initializer) + 2  # the weights once, plus keep/zero


def test_wire_splice_replaces_nodes_and_appends_outputs_without_touching_weights(tmp_path):
    from onnxprune.ir import wire

    src = tmp_path / "m.onnx"
    bench.generate(src, 2, 8)
    model = ir.load(src).proto
    patch = onnx.GraphProto()
    patch.node.extend(model.graph.node[:2])  # MatMul + Add of the first layer only
    patch.output.add().name = "add0"
    spliced = onnx.load_from_string(wire.splice(model.SerializeToString(), patch))
    assert [n.name for n in spliced.graph.node] == ["matmul0", "add0"]
    assert [o.name for o in spliced.graph.output] == ["add1", "add0"]
    assert [t.SerializeToString() for t in spliced.graph.initializer] == \
        [t.SerializeToString() for t in model.graph.initializer]
    tapped = onnx.load_from_string(wire.with_outputs(model.SerializeToString(), ["relu0"]))
    assert [o.name for o in tapped.graph.output] == ["add1", "relu0"] and tapped.graph.node == model.graph.node
