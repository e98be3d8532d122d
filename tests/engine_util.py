"""Shared checks for engine tests: prune a built graph, verify independently from the JSON report."""

from __future__ import annotations

import numpy as np
import onnx

import onnxprune
from onnxprune import runtime, verify
from onnxprune.data import random_feed


def prune_model(tmp_path, model: onnx.ModelProto, ratio: float = 0.5, **kw):
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    before = path.read_bytes()
    policy = onnxprune.Policy(ratio=ratio, **{k: kw.pop(k) for k in list(kw) if k in
                                               ("ratio_for", "ignore", "round_to", "global_ranking", "max_ratio")})
    result = onnxprune.prune(path, policy=policy, **kw)
    assert path.read_bytes() == before, "the input file must never change"
    assert result.verification is not None and result.verification.passed
    check_from_report(model, result)
    return result


def check_from_report(original: onnx.ModelProto, result) -> None:
    """Rebuild the masked reference from the report alone and compare (an independent check)."""
    rep = result.report()
    inits = {t.name for t in original.graph.initializer}
    consts = {n.output[0] for n in original.graph.node if n.op_type == "Constant"}
    removed = {}
    for g in rep["groups"]:
        for t in g["tensors"]:
            if t["tensor"] in inits or t["tensor"] in consts:
                continue
            axis, pos = removed.get(t["tensor"], (t["axis"], set()))
            removed[t["tensor"]] = (axis, pos | set(t["removed"]))
    removed = {k: (a, np.array(sorted(p))) for k, (a, p) in removed.items()}
    shapes = result.analysis.shapes
    ref = verify.masked_reference(original, removed, shapes)
    feeds = [random_feed(original, result.analysis.input_shapes, seed=7)]
    inputs, outputs = {i.name for i in original.graph.input}, {o.name for o in original.graph.output}
    cuts = {k: v for k, v in removed.items() if k in inputs}     # KV caches with kv_cache=True
    taps = {k: (f"{k}__masked", a, p) for k, (a, p) in removed.items() if k in outputs}
    for k in taps:
        ref.graph.output.add().name = f"{k}__masked"
    v = verify.compare(result.proto, ref, feeds, taps=taps, input_cuts=cuts)
    assert v.passed, v


def outputs(model: onnx.ModelProto, feed: dict) -> dict:
    return runtime.run(runtime.session(model), feed)


def weight(model: onnx.ModelProto, node_name: str, index: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if n.name == node_name)
    name = node.input[index]
    init = next(t for t in model.graph.initializer if t.name == name)
    return onnx.numpy_helper.to_array(init)


def node(model: onnx.ModelProto, op: str, k: int = 0) -> onnx.NodeProto:
    return [n for n in model.graph.node if n.op_type == op][k]


def attr(n: onnx.NodeProto, name: str):
    return next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == name), None)
