"""Model I/O: bad inputs to ``onnxprune inspect`` end in one clean line, and ``ir.save`` writes safely."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import onnx_graphsurgeon as gs
from builders import GraphBuilder
from onnx import external_data_helper, helper, numpy_helper

from onnxprune import ir, runtime
from onnxprune.cli import main
from onnxprune.errors import OnnxPruneError


def small_model() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8], dynamic_batch=True)
    g.output(g.gemm(g.flatten(g.gap(g.relu(g.conv("x", 16, k=3)))), 40))
    return g.build()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_model(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    sess = runtime.session(proto, optimize=False)
    return sess.run(None, {sess.inputs[0].name: x})


# ---------------------------------------------------------------- bad inputs to the CLI

def _truncated(d: Path) -> Path:
    data = (d / "good.onnx").read_bytes()
    (d / "cut.onnx").write_bytes(data[: len(data) // 2])
    return d / "cut.onnx"


def _external_missing(d: Path) -> Path:
    onnx.save(small_model(), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    (d / "ext.onnx.data").unlink()
    return d / "ext.onnx"


def _file(name: str, content: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(content)
        return d / name
    return make


# case -> (how to make the model path, extra CLI args, words the message must contain)
BAD_INPUTS = {
    "missing path": (lambda d: d / "nope.onnx", [], "no such file"),
    "directory": (lambda d: d, [], "is a directory"),
    "text file": (_file("notes.onnx", b"this is not a model\nat all\n"), [], "not"),
    "empty file": (_file("empty.onnx", b""), [], "empty"),
    "truncated model": (_truncated, [], "truncated"),
    "external data missing": (_external_missing, [], "ext.onnx.data"),
    "bad shape spec": (lambda d: d / "good.onnx", ["--input-shape", "x=1xAx8x8"], "NAME=DxDxD"),
    "unknown input": (lambda d: d / "good.onnx", ["--input-shape", "image=1x3x8x8"], "inputs are: x"),
    "JSON folder missing": (lambda d: d / "good.onnx", ["--json", "{d}/no/such/dir/s.json"], "does not exist"),
    "JSON folder is a file": (lambda d: d / "good.onnx", ["--json", "{d}/good.onnx/s.json"], "does not exist"),
}
# more of the same kinds, run in-process (the subprocess cases above already prove the process boundary)
MORE_BAD_ARGS = {
    "shape without name": (["--input-shape", "1x3x8x8"], "NAME=DxDxD"),
    "zero for a fixed dimension": (["--input-shape", "x=1x0x8x8"], "conflicts"),
    "named dimension unknown": (["--input-shape", "frames=4"], "inputs are"),
    "wrong rank": (["--input-shape", "x=1x3x8"], "rank"),
    "fixed dimension changed": (["--input-shape", "x=1x4x8x8"], "conflicts"),
    "JSON path is a folder": (["--json", "{d}"], "is a directory"),
    "option without value": (["--input-shape"], "expected one argument"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(cli, tmp_path, case):
    onnx.save(small_model(), tmp_path / "good.onnx")
    make, extra, words = BAD_INPUTS[case]
    path = make(tmp_path)
    before = {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()}

    res = cli("inspect", path, *[a.format(d=tmp_path) for a in extra])

    assert res.code == 2, res
    assert len(res.err.splitlines()) == 1, res
    assert res.err.startswith("onnxprune inspect: error: ") or res.err.startswith("onnxprune: error: "), res
    assert words in res.err, res
    assert "Traceback" not in res.err + res.out
    assert res.out == ""
    assert {p: digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written or changed


@pytest.mark.parametrize("case", list(MORE_BAD_ARGS))
def test_more_bad_arguments(tmp_path, capsys, case):
    onnx.save(small_model(), tmp_path / "good.onnx")
    before = digest(tmp_path / "good.onnx")
    args, words = MORE_BAD_ARGS[case]
    try:
        code = main(["inspect", str(tmp_path / "good.onnx"), *[a.format(d=tmp_path) for a in args]])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1 and words in err, (code, err)
    assert out == "" and "Traceback" not in err
    assert digest(tmp_path / "good.onnx") == before and [p.name for p in tmp_path.iterdir()] == ["good.onnx"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_json_folder(cli, tmp_path):
    onnx.save(small_model(), tmp_path / "good.onnx")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        res = cli("inspect", tmp_path / "good.onnx", "--json", locked / "s.json")
    finally:
        locked.chmod(0o700)
    assert res.code == 2 and len(res.err.splitlines()) == 1 and "not writable" in res.err, res


# ---------------------------------------------------------------- ir.save

def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old contents")
    held = tmp_path / "held"
    os.link(out, held)  # a reader holding the old file sees it whole, never a half-written mix
    model = small_model()

    written = ir.save(model, out)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["held", "out.onnx"]
    assert held.read_bytes() == b"old contents"  # replaced by rename, not rewritten in place
    assert written == out.stat().st_size
    assert onnx.load(out) == model


def test_save_refuses_to_overwrite_its_input(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(small_model(), src)
    before = digest(src)
    for same in (src, tmp_path / "." / "m.onnx", Path(os.path.relpath(src))):
        with pytest.raises(OnnxPruneError, match="output path is the input model"):
            ir.save(small_model(), same, source=src)
    assert digest(src) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("target, words", [("missing/out.onnx", "does not exist"), (".", "is a directory")])
def test_save_bad_output_path(tmp_path, target, words):
    with pytest.raises(OnnxPruneError, match=words):
        ir.save(small_model(), tmp_path / target)
    assert list(tmp_path.iterdir()) == []


def test_model_loaded_from_external_data_round_trips(tmp_path):
    model = small_model()
    onnx.save(small_model(), tmp_path / "src.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = ir.load(tmp_path / "src.onnx")
    assert loaded.file_bytes == (tmp_path / "src.onnx").stat().st_size + (tmp_path / "weights.bin").stat().st_size

    ir.save(loaded.proto, tmp_path / "plain.onnx", source=loaded.path)  # small: one self-contained file
    again = ir.load(tmp_path / "plain.onnx")
    assert again.file_bytes == (tmp_path / "plain.onnx").stat().st_size
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_model(again.proto, x)[0], run_model(model, x)[0])

    # a model that keeps its tensors marked external is written as model + .data, atomically
    external_data_helper.convert_model_to_external_data(loaded.proto, location="weights.bin", size_threshold=0)
    (tmp_path / "ext").mkdir()
    ir.save(loaded.proto, tmp_path / "ext" / "out.onnx", source=loaded.path)
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["out.onnx", "out.onnx.data"]
    back = ir.load(tmp_path / "ext" / "out.onnx")
    assert back.file_bytes > (tmp_path / "ext" / "out.onnx").stat().st_size
    for a, b in zip(model.graph.initializer, back.proto.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    sess = runtime.session(str(tmp_path / "ext" / "out.onnx"), optimize=False)  # a path: data found beside it
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], run_model(model, x)[0])


# ---------------------------------------------------------------- Constant-node lifting

PADDLE_CONSTANTS = {
    "conv.w": np.random.default_rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32),
    "conv.b": np.array([0.5, -0.25, 1.0, 0.0], np.float32),
    "flat": np.array([1, -1], np.int64),
    "scale": np.array(0.5, np.float32),
}


def paddle_style_model() -> onnx.ModelProto:
    """Weights, bias, a reshape target and a scale all held in Constant nodes, as Paddle exports them."""
    c = PADDLE_CONSTANTS
    nodes = [
        helper.make_node("Constant", [], ["conv.w"], value=numpy_helper.from_array(c["conv.w"], "conv.w")),
        helper.make_node("Constant", [], ["conv.b"], value_floats=c["conv.b"].tolist()),
        helper.make_node("Constant", [], ["flat"], value_ints=c["flat"].tolist()),
        helper.make_node("Constant", [], ["scale"], value_float=float(c["scale"])),
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Reshape", ["y", "flat"], ["r"]),
        helper.make_node("Mul", ["r", "scale"], ["out"]),
    ]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", 1, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("out", 1, [1, 100])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="PaddlePaddle")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_constant_nodes_lift_with_their_names_and_values():
    model = paddle_style_model()
    graph = ir.to_graph(model)

    assert not [n for n in graph.nodes if n.op == "Constant"]
    consts = {name: t for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert set(consts) == set(PADDLE_CONSTANTS)
    for name, value in PADDLE_CONSTANTS.items():
        assert consts[name].values.dtype == value.dtype and consts[name].values.shape == value.shape, name
        np.testing.assert_array_equal(consts[name].values, value)

    exported = ir.from_graph(graph, model)
    onnx.checker.check_model(exported, full_check=True)
    assert exported.producer_name == "PaddlePaddle" and exported.opset_import == model.opset_import
    assert {i.name for i in exported.graph.initializer} == set(PADDLE_CONSTANTS)
    x = np.random.default_rng(4).standard_normal((1, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(run_model(exported, x)[0], run_model(model, x)[0])
