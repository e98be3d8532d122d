"""Pad: other axes pass channels; constant padding of the channel axis (BlazeFace's channel_padding
residual) adds zero channels of its own, which can go too (the pad amount follows)."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import node, prune_model, weight


def _channel_pad_residual(mode="constant"):
    g = GraphBuilder("x", [1, 3, 8, 8])
    a = g.relu(g.conv("x", 8))
    b = g.conv(a, 12)
    p = g.op("Pad", [a, g.const(np.array([0, 0, 0, 0, 0, 4, 0, 0], np.int64))], mode=mode)
    y = g.relu(g.add(b, p))
    g.output(g.gemm(g.flatten(g.gap(g.conv(y, 6))), 3))
    return g.build()


def test_channel_padding_prunes_with_the_residual(tmp_path):
    r = prune_model(tmp_path, _channel_pad_residual(), ratio=0.5)
    convs = [n for n in r.proto.graph.node if n.op_type == "Conv"]
    assert weight(r.proto, convs[0].name).shape[0] == 4          # the padded block's own channels
    assert weight(r.proto, convs[1].name).shape[0] == 6          # the residual width: 12 -> 6
    pads = onnx.numpy_helper.to_array(next(t for t in r.proto.graph.initializer
                                           if t.name == node(r.proto, "Pad").input[1]))
    assert pads[1] == 0 and pads[5] + 4 == 6 and pads[5] >= 0    # 4 kept inputs + the kept padding = 6


def test_reflect_padding_of_the_channel_axis_freezes(tmp_path):
    r = prune_model(tmp_path, _channel_pad_residual("reflect"), ratio=0.5)
    assert any("pads the channel axis (reflect)" in x for f in r.report()["frozen"] for x in f["reasons"])
