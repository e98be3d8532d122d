"""The bad-input corpus, through the real CLI: every case ends in one line on stderr, exit 2, no traceback,
the input files byte-for-byte unchanged and nothing left in the output folder.

All cases share one folder of tiny models (built once per module); each case gets a fresh, empty
output folder. Cases that are not errors (exotic but valid graphs) are in test_exotic_graphs.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper


def tiny_net(**kw) -> GraphBuilder:
    """conv -> relu -> conv -> relu -> gap -> gemm: two prunable groups."""
    g = GraphBuilder("x", [1, 3, 8, 8], **kw)
    y = g.relu(g.conv("x", 8))
    y = g.relu(g.conv(y, 8))
    g.output(g.gemm(g.flatten(g.gap(y)), 4))
    return g


def _checker_rejects() -> onnx.ModelProto:
    m = tiny_net().build()
    m.graph.node[1].input[0] = "no_such_tensor"  # a node reads a tensor nothing produces
    return m


def _no_prunable_layer() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    g.output(g.maxpool(g.relu("x")))
    return g.build()


def _custom_op_unknown_to_onnxruntime() -> onnx.ModelProto:
    g = tiny_net()
    g.nodes.insert(2, helper.make_node("Mystery", ["relu_5"], ["mystery_out"], domain="com.example", name="mystery"))
    g.nodes[3].input[0] = "mystery_out"
    out = helper.make_tensor_value_info(g.outputs[0].name, TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph(g.nodes, "t", g.inputs, [out], g.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    m.ir_version = 8
    return m


def _bfloat16_arithmetic() -> onnx.ModelProto:
    """A bfloat16 Mul: valid ONNX, but onnxruntime's CPU provider has no kernel for it."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.op("Cast", [g.relu(g.conv("x", 8))], to=TensorProto.BFLOAT16)
    g.inits.append(helper.make_tensor("scale", TensorProto.BFLOAT16, [1, 8, 1, 1], np.linspace(0.5, 1.5, 8)))
    y = g.op("Cast", [g.op("Mul", [y, "scale"])], to=TensorProto.FLOAT)
    g.shapes[y] = [1, 8, 8, 8]
    g.output(g.gemm(g.flatten(g.gap(g.relu(g.conv(y, 8)))), 4))
    return g.build()


def _symbolic_channels() -> onnx.ModelProto:
    """Every input dimension symbolic, channels included: the default size 1 cannot run."""
    m = tiny_net().build()
    dims = m.graph.input[0].type.tensor_type.shape.dim
    for d, name in zip(dims, "NCHW"):
        d.dim_param = name
    return m


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    onnx.save(tiny_net(dynamic_batch=True).build(), d / "good.onnx")
    good = (d / "good.onnx").read_bytes()
    (d / "notes.onnx").write_text("this is a text file, not a model\n")
    (d / "empty.onnx").write_bytes(b"")
    (d / "truncated.onnx").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[40:80] = bytes(range(200, 240))
    (d / "corrupt.onnx").write_bytes(bytes(corrupt))
    onnx.save(tiny_net().build(), d / "ext.onnx", save_as_external_data=True, location="ext.weights",
              size_threshold=0)
    (d / "ext.weights").unlink()
    for name, make in [("checker.onnx", _checker_rejects), ("noprune.onnx", _no_prunable_layer),
                       ("custom.onnx", _custom_op_unknown_to_onnxruntime), ("bf16mul.onnx", _bfloat16_arithmetic),
                       ("symbolic.onnx", _symbolic_channels)]:
        onnx.save(make(), d / name)
    x = np.zeros([4, 3, 8, 8], np.float32)
    np.savez(d / "names.npz", image=x, mask=x)
    np.savez(d / "shape.npz", x=np.zeros([4, 3, 5, 5], np.float32))
    np.savez(d / "dtype.npz", x=np.full([4, 3, 8, 8], "a"))
    np.savez(d / "labels.npz", x=x, labels=np.zeros(3, np.int64))
    (d / "fake.npz").write_text("not a zip archive")
    return d


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# case -> (arguments with {d} = corpus folder, {o} = output folder; words the message must contain)
PRUNE_CASES = {
    "missing path": ("{d}/nope.onnx -o {o}/m.onnx", "no such file"),
    "directory": ("{d} -o {o}/m.onnx", "is a directory"),
    "text file": ("{d}/notes.onnx -o {o}/m.onnx", "not a valid ONNX model"),
    "empty file": ("{d}/empty.onnx -o {o}/m.onnx", "empty"),
    "truncated protobuf": ("{d}/truncated.onnx -o {o}/m.onnx", "truncated"),
    "corrupted protobuf": ("{d}/corrupt.onnx -o {o}/m.onnx", "ONNX model"),
    "external data missing": ("{d}/ext.onnx -o {o}/m.onnx", "'ext.weights' is missing"),
    "checker rejects": ("{d}/checker.onnx -o {o}/m.onnx", "onnx.checker rejects"),
    "no prunable layer": ("{d}/noprune.onnx -o {o}/m.onnx", "nothing to prune"),
    "custom op unknown to onnxruntime": ("{d}/custom.onnx -o {o}/m.onnx", "com.example:Mystery"),
    "bfloat16 op onnxruntime cannot run": ("{d}/bf16mul.onnx -o {o}/m.onnx", "cannot run the input model"),
    "symbolic channels, no --input-shape": ("{d}/symbolic.onnx -o {o}/m.onnx", "--input-shape"),
    "ratio 1.0": ("{d}/good.onnx -o {o}/m.onnx --ratio 1.0", "--ratio 1.0: must be in [0.0, 1.0)"),
    "ratio -0.1": ("{d}/good.onnx -o {o}/m.onnx --ratio=-0.1", "--ratio -0.1"),
    "ratio nan": ("{d}/good.onnx -o {o}/m.onnx --ratio nan", "--ratio nan"),
    "unknown criterion": ("{d}/good.onnx -o {o}/m.onnx --criterion magic", "unknown importance criterion"),
    "unreachable MACs target": ("{d}/good.onnx -o {o}/m.onnx --target-macs 0.001", "cannot be met"),
    "output is the input": ("{d}/good.onnx -o {d}/good.onnx", "is the input MODEL"),
    "output folder missing": ("{d}/good.onnx -o {o}/no/such/m.onnx", "does not exist"),
    "output folder unwritable": ("{d}/good.onnx -o /proc/m.onnx", "not writable"),
    "output path is a folder": ("{d}/good.onnx -o {o}", "is a directory"),
    "report folder unwritable": ("{d}/good.onnx -o {o}/m.onnx --report /proc/r.json", "not writable"),
    "calibration names": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/names.npz", "expected one array named 'x'"),
    "calibration shape": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/shape.npz", "has shape [4, 3, 5, 5]"),
    "calibration dtype": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/dtype.npz", "dtype <U1"),
    "calibration labels": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/labels.npz", "one label per sample"),
    "calibration not an npz": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/fake.npz", "not a readable .npz"),
}
OTHER_CASES = {
    "inspect: checker rejects": ("inspect {d}/checker.onnx", "onnx.checker rejects"),
    "eval: data names": ("eval {d}/good.onnx --data {d}/names.npz", "expected one array named 'x'"),
    "sparsify: sparsity 1.0": ("sparsify {d}/good.onnx -o {o}/m.onnx --sparsity 1.0", "--sparsity 1.0"),
    "sparsify: unwritable output": ("sparsify {d}/good.onnx -o /proc/m.onnx --sparsity 0.5", "/proc"),
}


def run_case(cli, corpus: Path, out: Path, spec: str):
    out.mkdir()
    before = digests(corpus)
    args = spec.format(d=corpus, o=out).split()
    res = cli(*(args if args[0] in ("inspect", "eval", "sparsify") else ["prune", *args]))
    command = args[0] if args[0] in ("inspect", "eval", "sparsify") else "prune"
    assert res.code == 2, res
    assert "Traceback" not in res.err + res.out, res
    lines = res.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"onnxprune {command}: error: "), res
    assert digests(corpus) == before, "an input file changed or a file appeared next to the inputs"
    assert list(out.iterdir()) == [], "output or temporary files left behind"
    return lines[0]


@pytest.mark.parametrize("case", list(PRUNE_CASES) + list(OTHER_CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(cli, corpus, tmp_path, case):
    spec, words = {**PRUNE_CASES, **OTHER_CASES}[case]
    line = run_case(cli, corpus, tmp_path / "out", spec)
    assert words in line, line


def test_debug_shows_the_traceback(cli, corpus, tmp_path):
    res = cli("--debug", "prune", corpus / "checker.onnx", "-o", tmp_path / "m.onnx")
    assert res.code != 0 and "Traceback" in res.err and "OnnxPruneError" in res.err
    assert not (tmp_path / "m.onnx").exists()
