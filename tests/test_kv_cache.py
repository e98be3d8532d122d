"""KV caches at the graph boundary: frozen (with the flag named) by default, pruned with --kv-cache."""

import json
import subprocess
import sys

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import prune_model
from onnx import TensorProto, helper

import onnxprune

T, P, D, H = 3, 5, 16, 2
DH = D // H


def _decoder_step():
    """One attention layer with a KV cache: past_key_values.0.{key,value} [1, H, P, DH] are
    concatenated with this step's keys/values and returned as present.0.{key,value}."""
    g = GraphBuilder("x", [1, T, D])
    pk, pv = "past_key_values.0.key", "past_key_values.0.value"
    for name in (pk, pv):
        g.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, H, "past", DH]))
        g.shapes[name] = [1, H, P, DH]

    def heads(t):
        return g.transpose(g.reshape(t, [1, T, H, DH]), [0, 2, 1, 3])
    q = heads(g.matmul("x", D))
    k = g.op("Concat", [pk, heads(g.matmul("x", D))], axis=2)
    v = g.op("Concat", [pv, heads(g.matmul("x", D))], axis=2)
    s = g.mul(g.op("MatMul", [q, g.transpose(k, [0, 1, 3, 2])]), g.const(np.float32(DH ** -0.5)))
    o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
    o = g.reshape(g.transpose(o, [0, 2, 1, 3]), [1, T, D])
    g.output(g.add("x", g.matmul(o, D)))
    for t, name in ((k, "present.0.key"), (v, "present.0.value")):
        g.nodes.append(helper.make_node("Identity", [t], [name], name=f"out_{name}"))
        g.output(name)
    return g.build()


def _graph_io(proto):
    dims = {}
    for vi in list(proto.graph.input) + list(proto.graph.output):
        dims[vi.name] = [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]
    return dims


def test_kv_cache_frozen_without_flag_and_the_report_names_it(tmp_path):
    r = prune_model(tmp_path, _decoder_step(), ratio=0.5)
    reasons = [x for f in r.report()["frozen"] for x in f["reasons"]]
    assert any("--kv-cache" in x and "past_key_values.0.key" in x for x in reasons), reasons
    io = _graph_io(r.proto)
    assert io["past_key_values.0.key"] == [1, H, "past", DH]
    assert io["present.0.value"][1] == H and io["present.0.value"][3] == DH


def test_kv_cache_shrinks_with_flag(tmp_path):
    m = _decoder_step()
    r = prune_model(tmp_path, m, ratio=0.5, kv_cache=True)
    assert r.report()["kv_cache"] is True
    io = _graph_io(r.proto)
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        assert io[name][1] * io[name][3] == H * DH // 2, io[name]
        assert io[name][2] == "past"          # the symbolic sequence axis is untouched
    # the pruned model runs on caches of the new size, at any past length
    feed = {"x": np.ones((1, T, D), np.float32)}
    for name in ("past_key_values.0.key", "past_key_values.0.value"):
        feed[name] = np.ones([1, io[name][1], 7, io[name][3]], np.float32)
    out = onnxprune.runtime.run(onnxprune.runtime.session(r.proto), feed)
    assert out["present.0.key"].shape == (1, io["past_key_values.0.key"][1], 7 + T, io["past_key_values.0.key"][3])


def test_kv_cache_cli_flag(tmp_path):
    src = tmp_path / "dec.onnx"
    onnx.save(_decoder_step(), src)
    rep = tmp_path / "rep.json"
    cmd = [sys.executable, "-m", "onnxprune", "prune", str(src), "-o", str(tmp_path / "out.onnx"), "--ratio", "0.5",
           "--round-to", "1", "--report", str(rep)]
    # without the flag every head dimension is tied to a cache: nothing to prune, and the message says why
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 2 and "--kv-cache" in first.stderr and not rep.exists()
    assert subprocess.run(cmd + ["--kv-cache"], capture_output=True).returncode == 0
    data = json.loads(rep.read_text())
    assert data["kv_cache"] is True and data["verified"] is True
    io = _graph_io(onnx.load(tmp_path / "out.onnx"))
    assert io["present.0.key"][1] * io["present.0.key"][3] < H * DH
