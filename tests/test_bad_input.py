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
    _values_corpus(d)
    return d


def _values_corpus(d: Path) -> None:
    """Files whose structure is fine but whose values are not (issue 15)."""
    huge = tiny_net().build()
    w = huge.graph.initializer[0]
    w.ClearField("raw_data")
    del w.float_data[:]
    w.dims[:] = [1000000, 1000000, 1, 1]   # ~1e12 elements declared, no data
    onnx.save(huge, d / "huge.onnx")
    for bad, name in ((np.nan, "nan.onnx"), (np.inf, "inf.onnx")):
        m = tiny_net().build()
        t = m.graph.initializer[0]
        a = onnx.numpy_helper.to_array(t).copy()
        a.flat[5] = bad
        t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
        onnx.save(m, d / name)
    dyn = tiny_net().build()
    for dim in dyn.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "S"
    onnx.save(dyn, d / "dyn.onnx")
    x = np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32)
    np.savez(d / "calib.npz", x=x)
    for value, name in ((np.nan, "nancalib.npz"), (np.inf, "infcalib.npz")):
        y = x.copy()
        y[3, 0, 1, 1] = value
        np.savez(d / name, x=y)
    np.savez(d / "farlabels.npz", x=x, labels=np.arange(8) + 10)
    np.savez(d / "neglabels.npz", x=x, labels=-np.ones(8, np.int64))
    (d / "plan_list.json").write_text("[1, 2]")
    (d / "plan_str.json").write_text('{"groups": "abc"}')
    (d / "plan_mixed.json").write_text('{"groups": [{"group": 0, "label": "Conv_4", "removed": ["a", null, 1.5]}]}')
    (d / "plan_floats.json").write_text('{"groups": [{"group": 0, "label": "Conv_4", "removed": [1.7, 2.2]}]}')
    (d / "sens.json").write_text('{"suggested_ratios": {"Conv_4": 0.5, "/no/such/layer": 0.2}}')


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
    "output is the input": ("{d}/good.onnx -o {d}/good.onnx", "is the input model"),
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
VALUE_CASES = {
    "weight declaring 1e12 elements without data": ("{d}/huge.onnx -o {o}/m.onnx", "declares shape [1000000"),
    "inspect: weight declaring 1e12 elements": ("inspect {d}/huge.onnx", "holds 0 B of data"),
    "input shape that cannot fit in memory": ("{d}/dyn.onnx -o {o}/m.onnx --input-shape x=1x3x100000x100000",
                                              "for the inputs alone"),
    "inspect: input shape that cannot fit": ("inspect {d}/dyn.onnx --input-shape x=1x3x100000x100000",
                                             "memory available"),
    "NaN weight": ("{d}/nan.onnx -o {o}/m.onnx --round-to 1", "'w_1' of Conv"),
    "infinite weight": ("{d}/inf.onnx -o {o}/m.onnx --round-to 1", "infinite value"),
    "plan is a list": ("{d}/good.onnx -o {o}/m.onnx --plan {d}/plan_list.json", "a JSON list"),
    "plan groups is a string": ("{d}/good.onnx -o {o}/m.onnx --plan {d}/plan_str.json", "'groups' is a str"),
    "plan removed holds non-integers": ("{d}/good.onnx -o {o}/m.onnx --plan {d}/plan_mixed.json",
                                        "'a' is not a channel"),
    "plan removed holds floats": ("{d}/good.onnx -o {o}/m.onnx --plan {d}/plan_floats.json", "1.7 is not"),
    "--ignore an unknown name": ("{d}/good.onnx -o {o}/m.onnx --ignore Conv_44", "did you mean 'Conv_4'"),
    "--ignore a name with no close match": ("{d}/good.onnx -o {o}/m.onnx --ignore nosuch", "names no layer"),
    "--ratio-for an unknown name": ("{d}/good.onnx -o {o}/m.onnx --ratio-for no/such=0.5", "--ratio-for 'no/such'"),
    "--ratios-from with an unknown layer": ("{d}/good.onnx -o {o}/m.onnx --ratios-from {d}/sens.json",
                                            "layer '/no/such/layer'"),
    "sparsify --ignore an unknown name": ("sparsify {d}/good.onnx -o {o}/m.onnx --sparsity 0.5 --ignore w_11",
                                          "did you mean"),
    "NaN in calibration data": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/nancalib.npz", "first in sample 3"),
    "infinity in evaluation data": ("eval {d}/good.onnx --data {d}/infcalib.npz", "NaN or infinite"),
    "labels beyond the classes": ("eval {d}/good.onnx --data {d}/farlabels.npz", "label 10 is out of range"),
    "negative labels": ("eval {d}/good.onnx --data {d}/neglabels.npz", "class indices start at 0"),
    "--finetune-lr nan": ("{d}/good.onnx -o {o}/m.onnx --calib {d}/calib.npz --finetune-steps 5 "
                          "--finetune-lr nan", "--finetune-lr nan: must be a finite number"),
    "finetune --lr inf": ("finetune {d}/good.onnx -o {o}/m.onnx --data {d}/calib.npz --lr inf", "finite number"),
    "--bench-runs 1000000000": ("{d}/good.onnx -o {o}/m.onnx --data {d}/calib.npz --bench-runs 1000000000",
                                "--bench-runs 1000000000: must be from 0 to 10,000"),
    "bench --runs 1e9": ("bench {d}/good.onnx --runs 1e9", "invalid int value"),
}
OTHER_CASES = {
    "inspect: checker rejects": ("inspect {d}/checker.onnx", "onnx.checker rejects"),
    "eval: data names": ("eval {d}/good.onnx --data {d}/names.npz", "expected one array named 'x'"),
    "sparsify: sparsity 1.0": ("sparsify {d}/good.onnx -o {o}/m.onnx --sparsity 1.0", "--sparsity 1.0"),
    "sparsify: unwritable output": ("sparsify {d}/good.onnx -o /proc/m.onnx --sparsity 0.5", "/proc"),
}


COMMANDS = ("inspect", "eval", "sparsify", "bench", "finetune")


def run_case(cli, corpus: Path, out: Path, spec: str):
    out.mkdir()
    before = digests(corpus)
    args = spec.format(d=corpus, o=out).split()
    res = cli(*(args if args[0] in COMMANDS else ["prune", *args]))
    command = args[0] if args[0] in COMMANDS else "prune"
    assert res.code == 2, res
    assert "Traceback" not in res.err + res.out, res
    lines = res.err.splitlines()
    assert len(lines) == 1 and (lines[0].startswith(f"onnxprune {command}: error: ")
                                or lines[0].startswith("onnxprune: error: ")), res
    assert digests(corpus) == before, "an input file changed or a file appeared next to the inputs"
    assert list(out.iterdir()) == [], "output or temporary files left behind"
    return lines[0]


@pytest.mark.parametrize("case", list(PRUNE_CASES) + list(OTHER_CASES) + list(VALUE_CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(cli, corpus, tmp_path, case):
    spec, words = {**PRUNE_CASES, **OTHER_CASES, **VALUE_CASES}[case]
    line = run_case(cli, corpus, tmp_path / "out", spec)
    assert words in line, line


def test_debug_shows_the_traceback(cli, corpus, tmp_path):
    res = cli("--debug", "prune", corpus / "checker.onnx", "-o", tmp_path / "m.onnx")
    assert res.code != 0 and "Traceback" in res.err and "OnnxPruneError" in res.err
    assert not (tmp_path / "m.onnx").exists()
