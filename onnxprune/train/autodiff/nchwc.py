"""Run convolutions whose weights change every step on onnxruntime's blocked-layout (NCHWc) kernels.

onnxruntime rewrites a Conv into its fast ``com.microsoft.nchwc`` form only when the
weight is a constant: it re-lays the weight out once, at session build. In a
fine-tuning graph the weights are fed every step, so every Conv (forward, and the
input gradient's Conv with the flipped kernel) falls back to im2col + GEMM, about
twice as slow. :func:`lower` does the rewrite itself, with the re-layout as graph
nodes on the fed weight (a few small Reshape/Transpose nodes per weight):

    Conv(x, w, b) -> ReorderOutput(nchwc.Conv(ReorderInput(x), blocked(w), padded(b)))

The block size is the CPU's (8 with AVX2, 16 with AVX-512); :func:`block_size` asks
onnxruntime and is 0 where it has no NCHWc kernels, in which case :func:`lower`
changes nothing. The lowered graph runs only in onnxruntime on the machine it was
lowered for: build sessions from it, never save it.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
from onnx import helper

from ... import ir, runtime
from .emit import Emitter

DOMAIN = "com.microsoft.nchwc"


@functools.lru_cache(maxsize=None)
def block_size() -> int:
    """The channel block of onnxruntime's NCHWc kernels on this CPU, 0 when it has none."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("ReorderInput", ["x"], ["y"], domain=DOMAIN)], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    model.ir_version = 7
    try:
        out = runtime.session(model, optimize=False).run(None, {"x": np.zeros([1, 4, 1, 1], np.float32)})[0]
    except Exception:  # noqa: BLE001 - any failure means no usable NCHWc kernels
        return 0
    return int(out.shape[1])


def lower(proto: onnx.ModelProto, block: int | None = None) -> onnx.ModelProto:
    """A copy of ``proto`` whose 2-D, ungrouped float Convs with a non-constant weight run as NCHWc Convs.

    A Conv qualifies when its weight depends on a graph input, its shape is known,
    and its input channels are a multiple of the block (or fewer than one block, read
    in plain NCHW); others are kept. ``block`` defaults to :func:`block_size`.
    """
    block = block_size() if block is None else block
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    if block <= 1:
        return model
    g = model.graph
    shapes, dynamic = ir.infer(model), _dynamic(g)
    taken = ({t for n in g.node for t in list(n.input) + list(n.output)} | {n.name for n in g.node}
             | {i.name for i in g.input} | {i.name for i in g.initializer})
    e = Emitter(onnx.TensorProto.FLOAT, ir.Model(model).opset, taken, prefix="nchwc")
    nodes = []
    for node in g.node:
        w_shape = _lowerable(node, shapes, dynamic, block)
        if w_shape is None:
            nodes.append(node)
            continue
        start = len(e.nodes)
        _emit_conv(e, node, w_shape, block)
        nodes.extend(e.nodes[start:])
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(e.inits)
    if e.nodes and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return model


def _dynamic(graph: onnx.GraphProto) -> set[str]:
    """Tensors computed from a graph input (not foldable into constants)."""
    inits = {t.name for t in graph.initializer}
    out = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if any(t in out for t in node.input):
            out |= set(node.output)
    return out


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _lowerable(node: onnx.NodeProto, shapes: dict, dynamic: set[str], block: int) -> list[int] | None:
    """The weight shape [M, C, kh, kw] of a Conv that :func:`lower` rewrites, else None."""
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    x, w = node.input[0], node.input[1]
    if w not in dynamic or _attr(node, "group", 1) != 1 or _attr(node, "auto_pad", b"NOTSET") != b"NOTSET":
        return None
    w_shape, x_info = shapes.get(w, (None, 0))[0], shapes.get(x)
    if x_info is None or x_info[1] != onnx.TensorProto.FLOAT or len(x_info[0]) != 4:
        return None
    if not w_shape or len(w_shape) != 4 or None in w_shape:
        return None
    channels = w_shape[1]
    return list(w_shape) if channels < block or channels % block == 0 else None


def _emit_conv(e: Emitter, node: onnx.NodeProto, w_shape: list[int], block: int) -> None:
    """The NCHWc replacement of ``node``; its output keeps the Conv's name and NCHW layout."""
    m, c, kh, kw = w_shape
    padded = -(-m // block) * block
    w = node.input[1]
    if padded != m:
        w = e.op("Pad", [w, e.ints([0, 0, 0, 0, padded - m, 0, 0, 0])])
    if c < block:  # OIHWBo: output channels blocked, input read as plain NCHW
        w = e.reshape(e.transpose(e.reshape(w, [padded // block, block, c, kh, kw]), [0, 2, 3, 4, 1]),
                      [padded, c, kh, kw])
        x = node.input[0]
    else:          # OIHWBiBo: both blocked
        w = e.reshape(e.transpose(e.reshape(w, [padded // block, block, c // block, block, kh, kw]),
                                  [0, 2, 4, 5, 3, 1]), [padded, c, kh, kw])
        x = _custom(e, "ReorderInput", [node.input[0]])
    inputs = [x, w]
    if len(node.input) > 2 and node.input[2]:
        bias = node.input[2]
        inputs.append(e.op("Pad", [bias, e.ints([0, padded - m])]) if padded != m else bias)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "auto_pad"}
    attrs["kernel_shape"] = [kh, kw]
    y = _custom(e, "Conv", inputs, **attrs)
    e.nodes.append(helper.make_node("ReorderOutput", [y], [node.output[0]], name=e.fresh("ReorderOutput"),
                                    domain=DOMAIN, channels=m))


def _custom(e: Emitter, op_type: str, inputs: list[str], **attrs) -> str:
    out = e.fresh(op_type.lower())
    e.nodes.append(helper.make_node(op_type, inputs, [out], name=e.fresh(op_type), domain=DOMAIN, **attrs))
    return out
