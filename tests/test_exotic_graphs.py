"""Valid but unusual graphs: onnxprune prunes what is safe, verifies it, and reports the rest as barriers.

Each case runs ``onnxprune prune --ratio 0.5 --report`` on a tiny model and checks exit 0,
``verified: true``, the expected barrier (op and reason words), and the shapes of pruned weights.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from onnx import TensorProto, helper, numpy_helper

import onnxprune.ir as ir

NEWEST = onnx.defs.onnx_opset_version()


def _tail(g: GraphBuilder, y: str, c: int = 8) -> None:
    """Two plain convs and a classifier after ``y`` (whose shape is [1, c, 8, 8]): prunable groups."""
    g.shapes[y] = [1, c, 8, 8]
    for _ in range(2):
        y = g.relu(g.conv(y, 8))
        g.shapes[y] = [1, 8, 8, 8]
    y = g.gap(y)
    g.shapes[y] = [1, 8, 1, 1]
    y = g.flatten(y)
    g.shapes[y] = [1, 8]
    out = g.gemm(y, 4)
    g.outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 4]))


def split_squeeze(opset: int) -> onnx.ModelProto:
    """Split and Squeeze in their opset-11 attribute form or their opset-13 input form."""
    g = GraphBuilder("x", [1, 4, 8, 8], opset=opset)
    y = g.relu(g.conv("x", 8))
    if opset < 13:
        a, b = g.op("Split", [y], n_out=2, axis=1, split=[4, 4])
    else:
        a, b = g.op("Split", [y, g.const(np.array([4, 4], np.int64))], n_out=2, axis=1)
    y = g.gap(g.concat([g.relu(g.conv(a, 6)), g.relu(g.conv(b, 6))]))
    axes = [2, 3]
    y = g.op("Squeeze", [y], axes=axes) if opset < 13 else g.op("Squeeze", [y, g.const(np.array(axes, np.int64))])
    g.output(g.gemm(y, 4))
    return g.build()


def float16() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    g.inputs[0].type.tensor_type.elem_type = TensorProto.FLOAT16

    def w(shape):
        return g.const((g.rng.standard_normal(shape) * 0.3).astype(np.float16))
    y = g.relu(g.op("Conv", ["x", w([8, 3, 3, 3]), w([8])], kernel_shape=[3, 3], pads=[1] * 4))
    y = g.relu(g.op("Conv", [y, w([8, 8, 3, 3]), w([8])], kernel_shape=[3, 3], pads=[1] * 4))
    g.output(g.op("Gemm", [g.flatten(g.gap(y)), w([4, 8])], transB=1), TensorProto.FLOAT16)
    return g.build()


def cast_weights(dtype: int) -> onnx.ModelProto:
    """A conv whose weights are stored as float16 or bfloat16 and cast to float32 at run time."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    w = (g.rng.standard_normal([8, 3, 3, 3]) * 0.3).astype(np.float32)
    g.inits.append(helper.make_tensor("w_stored", dtype, w.shape, w.astype(np.float16) if dtype == TensorProto.FLOAT16
                                      else w.ravel()))
    y = g.relu(g.op("Conv", ["x", g.op("Cast", ["w_stored"], to=TensorProto.FLOAT)], kernel_shape=[3, 3],
                    pads=[1] * 4))
    _tail(g, y)
    return finish(g)


def symbolic_everything() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    _tail(g, y)
    m = finish(g)
    for d, name in zip(m.graph.input[0].type.tensor_type.shape.dim, "NCHW"):
        d.dim_param = name
    return m


def _qdq(g: GraphBuilder, x: str) -> str:
    s, z = g.const(np.array(0.05, np.float32)), g.const(np.array(0, np.int8))
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, s, z]), s, z])


def qdq_conv() -> onnx.ModelProto:
    """float conv -> QDQ -> conv with per-channel DequantizeLinear'd int8 weights -> float convs."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    w = (g.rng.standard_normal([8, 8, 3, 3]) * 0.3).astype(np.float32)
    scale = (np.abs(w).reshape(8, -1).max(1) / 127).astype(np.float32)
    wq = np.round(w / scale[:, None, None, None]).astype(np.int8)
    wd = g.op("DequantizeLinear", [g.const(wq), g.const(scale), g.const(np.zeros(8, np.int8))], axis=0)
    y = g.relu(g.op("Conv", [_qdq(g, y), wd], kernel_shape=[3, 3], pads=[1] * 4))
    _tail(g, y)
    return finish(g)


def qlinear_conv() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    s, z = g.const(np.array(0.05, np.float32)), g.const(np.array(0, np.uint8))
    wq = g.const(g.rng.integers(-20, 20, [8, 8, 3, 3]).astype(np.int8))
    ws, wz = g.const(np.array(0.01, np.float32)), g.const(np.array(0, np.int8))
    q = g.op("QLinearConv", [g.op("QuantizeLinear", [y, s, z]), s, z, wq, ws, wz, s, z], kernel_shape=[3, 3],
             pads=[1] * 4)
    _tail(g, g.op("DequantizeLinear", [q, s, z]))
    return finish(g)


def if_subgraph() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    g.input("cond", [], dtype=TensorProto.BOOL)
    y = g.relu(g.conv(g.relu(g.conv("x", 8)), 8))
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 8, 8, 8]) for n in ("t", "e")]
    then = helper.make_graph([helper.make_node("Relu", [y], ["t"])], "then", [], [vi[0]])
    other = helper.make_graph([helper.make_node("Neg", [y], ["e"])], "else", [], [vi[1]])
    g.nodes.append(helper.make_node("If", ["cond"], ["branch"], then_branch=then, else_branch=other, name="the_if"))
    _tail(g, "branch")
    return finish(g)


def loop_subgraph() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv(g.relu(g.conv("x", 8)), 8))
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 8, 8, 8])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    trips, cond = g.const(np.array(3, np.int64)), g.const(np.array(True))
    g.nodes.append(helper.make_node("Loop", [trips, cond, y], ["looped"], body=body, name="the_loop"))
    _tail(g, "looped")
    return finish(g)


def scan_subgraph() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.reshape(g.relu(g.conv(g.relu(g.conv("x", 8)), 8)), [8, 8, 8])
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_in"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_out"])],
        "sbody", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 8]) for n in ("s_in", "x_in")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [8, 8]) for n in ("s_out", "y_out")])
    total, _ = g.op("Scan", [g.const(np.zeros([8, 8], np.float32)), y], n_out=2, body=body, num_scan_inputs=1)
    _tail(g, g.reshape(total, [1, 1, 8, 8]), c=1)
    return finish(g)


def custom_op() -> onnx.ModelProto:
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 8))
    # an onnxruntime contrib op without a rule in onnxprune (rules/contrib.py has the common ones)
    g.nodes.append(helper.make_node("FusedMatMul", [y, g.const(np.eye(8, dtype=np.float32))], ["ms_out"],
                                    domain="com.microsoft", name="ms_fused_matmul", alpha=1.0))
    _tail(g, "ms_out")
    return finish(g, [helper.make_opsetid("com.microsoft", 1)])


def finish(g: GraphBuilder, extra_opsets=()) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(g.nodes, "exotic", g.inputs, g.outputs, g.inits),
                          opset_imports=[helper.make_opsetid("", g.opset), *extra_opsets])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# case -> (model, extra CLI args, groups pruned at least, expected barrier (op, words) or None)
CASES = {
    "opset 11": (lambda: split_squeeze(11), [], 3, None),
    "opset 13": (lambda: split_squeeze(13), [], 3, None),
    f"opset {NEWEST} (newest)": (lambda: split_squeeze(NEWEST), [], 3, None),
    "float16": (float16, [], 2, None),
    "float16 stored weights": (lambda: cast_weights(TensorProto.FLOAT16), [], 2, ("Conv", "cast at run time")),
    "bfloat16 stored weights": (lambda: cast_weights(TensorProto.BFLOAT16), [], 2, ("Conv", "cast at run time")),
    "fully dynamic input": (symbolic_everything, ["--input-shape", "x=2x3x8x8"], 3, None),
    "QDQ conv": (qdq_conv, [], 2, ("Conv", "dequantized at run time")),
    "QLinearConv": (qlinear_conv, [], 2, ("QLinearConv", "quantized")),
    "If": (if_subgraph, [], 3, ("If", "subgraph")),
    "Loop": (loop_subgraph, [], 3, ("Loop", "control flow")),
    "Scan": (scan_subgraph, [], 1, ("Scan", "control flow")),
    "custom-domain op": (custom_op, [], 2, ("FusedMatMul", "custom domain 'com.microsoft'")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prunes_what_is_safe_and_reports_the_rest(cli, tmp_path, case):
    make, extra, min_pruned, barrier = CASES[case]
    src, out, rep = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(make(), src)
    before = src.read_bytes()

    res = cli("prune", src, "-o", out, "--ratio", "0.5", "--report", rep, *extra)

    assert res.code == 0, res
    assert src.read_bytes() == before
    r = json.loads(rep.read_text())
    assert r["verified"] is True and r["groups_pruned"] >= min_pruned, r["groups_pruned"]
    if barrier:
        op, words = barrier
        assert any(b["op"] == op and words in b["reason"] for b in r["barriers"]), r["barriers"]
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned)
    shapes = {t.name: list(t.dims) for t in pruned.graph.initializer}
    removed: dict[tuple[str, int], set] = {}  # a tensor may lose positions to several groups
    for g in r["groups"]:
        for t in g["tensors"]:
            removed.setdefault((t["tensor"], t["axis"]), set()).update(t["removed"])
    checked = 0
    for (name, axis), positions in removed.items():  # every pruned weight lost exactly the reported positions
        if name in shapes:
            assert shapes[name][axis] == _dims(before, name)[axis] - len(positions), (name, axis)
            checked += 1
    assert checked >= min_pruned


def _dims(model_bytes: bytes, name: str) -> list[int]:
    m = onnx.load_from_string(model_bytes)
    return next(list(t.dims) for t in m.graph.initializer if t.name == name)


def test_bfloat16_initializers_slice_and_round_trip():
    """onnx reads bfloat16 as ml_dtypes arrays; the graph layer slices them and writes bfloat16 back."""
    values = np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6)
    t = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 6], values.ravel())
    m = helper.make_model(helper.make_graph([helper.make_node("Cast", ["w"], ["y"], to=TensorProto.FLOAT)], "g", [],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [t]),
                          opset_imports=[helper.make_opsetid("", 17)])
    graph = ir.to_graph(m)
    const = graph.tensors()["w"]
    const.values = np.delete(np.asarray(const.values), [1, 4], axis=1)
    back = ir.from_graph(graph, m)
    w = back.graph.initializer[0]
    assert w.data_type == TensorProto.BFLOAT16 and list(w.dims) == [4, 4]
    got = numpy_helper.to_array(w).astype(np.float32)
    np.testing.assert_allclose(got, np.delete(values, [1, 4], axis=1), atol=1e-2)
