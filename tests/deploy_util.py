"""The small CNN the runtime, OpenVINO and quantization tests prune, run and quantize."""

import onnx
from builders import GraphBuilder


def small_cnn(path):
    """Conv-BN-ReLU, a residual Add, a strided Conv, GAP and a Gemm; dynamic batch, input x [N, 3, 12, 12]."""
    g = GraphBuilder("x", [1, 3, 12, 12], dynamic_batch=True)
    y = g.relu(g.bn(g.conv("x", 16)))
    y = g.relu(g.add(y, g.conv(y, 16)))
    y = g.relu(g.conv(y, 32, stride=2))
    g.output(g.gemm(g.flatten(g.gap(y)), 10))
    onnx.save(g.build(), path)
    return path
