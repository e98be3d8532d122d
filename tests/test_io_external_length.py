"""Regression (issue 13): external data entries with ``location`` but no ``length`` (the torch legacy
exporter's one-file-per-tensor layout for models over 2 GB; the ONNX spec makes length optional)."""

import numpy as np
import onnx
from builders import GraphBuilder

import onnxprune


def test_external_data_without_length_loads_prunes_and_verifies(tmp_path, monkeypatch):
    # the >2 GB paths on a small model: weights left on disk (lazy) and read one by one
    from onnxprune import ir, verify
    monkeypatch.setattr(ir.limits, "LAZY_BYTES", 0)
    monkeypatch.setattr(ir.limits, "TWO_GB", 4096)
    monkeypatch.setattr(ir.limits, "CHECK_WEIGHTS_BYTES", 4096)
    monkeypatch.setattr(verify, "SHARE_WEIGHTS_BYTES", 4096)
    g = GraphBuilder("x", [1, 3, 8, 8])
    y = g.relu(g.conv("x", 16))
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 8))), 4))
    model = g.build()
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    header = onnx.load(str(path), load_external_data=False)
    stripped = 0
    for t in header.graph.initializer:
        keep = [(e.key, e.value) for e in t.external_data if e.key not in ("length", "offset")]
        stripped += len(t.external_data) - len(keep)
        del t.external_data[:]
        for k, v in keep:
            t.external_data.add(key=k, value=v)
    assert stripped
    onnx.save(header, path)       # the header only: the data files stay as written
    r = onnxprune.prune(path, policy=onnxprune.Policy(ratio=0.5))
    assert r.verification.passed
    conv = next(n for n in r.proto.graph.node if n.op_type == "Conv")
    w = next(t for t in r.proto.graph.initializer if t.name == conv.input[1])
    assert list(w.dims)[0] == 8
    out = tmp_path / "out.onnx"
    onnxprune.save(r, out)
    sess = onnxprune.runtime.session(onnx.load(str(out)))
    assert np.isfinite(onnxprune.runtime.run(sess, {"x": np.ones((1, 3, 8, 8), np.float32)})[
        r.proto.graph.output[0].name]).all()
