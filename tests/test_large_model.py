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
    monkeypatch.setattr(ir, "TWO_GB", 4096)
    monkeypatch.setattr(ir, "CHECK_WEIGHTS_BYTES", 4096)
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
