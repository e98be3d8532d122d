"""Shape arithmetic computed at run time (dynamic batch and sequence): elements that hold a channel
count are rewritten, elements read from symbolic dimensions stay computed, data derived from a
channel count keeps its value. The same model prunes to the same structure static or dynamic."""

import numpy as np
import onnx
from builders import GraphBuilder
from engine_util import node, prune_model
from onnx import TensorProto, helper

from onnxprune import runtime

T, D, H = 4, 16, 2
DH = D // H
I64 = np.int64


class Shapes:
    """Torch-legacy-style shape arithmetic on a GraphBuilder: sizes read with Shape/Gather, glued with Concat."""

    def __init__(self, g: GraphBuilder, dynamic: bool):
        self.g, self.dynamic = g, dynamic

    def dim(self, x, i):
        g = self.g
        return g.op("Unsqueeze", [g.op("Gather", [g.op("Shape", [x]), g.const(np.array(i, I64))], axis=0),
                                  g.const(np.array([0], I64))])

    def target(self, x, *rest):
        """[B, T, *rest] with B, T read from ``x`` (dynamic) or constants (static); an int in ``rest``
        is a constant, a string a tensor (already a 1-element vector)."""
        g = self.g
        head = [self.dim(x, 0), self.dim(x, 1)] if self.dynamic else [g.const(np.array([1, T], I64))]
        pieces = [r if isinstance(r, str) else g.const(np.array([r], I64)) for r in rest]
        return g.op("Concat", head + pieces, axis=0)


def attention(dynamic: bool, scale_from_shape: bool = True):
    g = GraphBuilder(None)
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D] if dynamic else [1, T, D]))
    g.shapes["x"] = [1, T, D]
    s = Shapes(g, dynamic)

    def heads(t):
        return g.transpose(g.op("Reshape", [t, s.target("x", H, DH)]), [0, 2, 1, 3])
    q, k, v = (heads(g.matmul("x", D)) for _ in range(3))
    scores = g.op("MatMul", [q, g.transpose(k, [0, 1, 3, 2])])
    if scale_from_shape:   # torch's SDPA: 1 / sqrt(q.size(-1)) read at run time
        d = g.op("Cast", [g.op("Gather", [g.op("Shape", [q]), g.const(np.array(3, I64))], axis=0)], to=1)
        scores = g.op("Div", [scores, g.op("Sqrt", [d])])
    else:
        scores = g.mul(scores, g.const(np.float32(DH ** -0.5)))
    o = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
    o = g.op("Reshape", [g.transpose(o, [0, 2, 1, 3]), s.target("x", -1)])
    g.shapes[o] = [1, T, D]       # shape inference cannot see through a computed target
    x = g.add("x", g.matmul(o, D))
    m = g.relu(g.matmul(x, 2 * D))
    g.output(g.add(x, g.matmul(m, D)))
    return g.build()


def _weights(proto):
    inits = {t.name: t for t in proto.graph.initializer}
    return [list(inits[n.input[1]].dims) for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def _run(proto, b, t):
    feed = {"x": np.random.default_rng(0).standard_normal((b, t, D)).astype(np.float32)}
    return runtime.run(runtime.session(proto), feed)


def test_dynamic_attention_prunes_like_the_static_export(tmp_path):
    dyn = prune_model(tmp_path, attention(dynamic=True), ratio=0.5)
    static = prune_model(tmp_path, attention(dynamic=False), ratio=0.5)
    assert _weights(dyn.proto) == _weights(static.proto)
    shapes = _weights(dyn.proto)
    assert shapes[:3] == [[D, D // 2]] * 3 and shapes[3] == [D // 2, D]    # q, k, v, o: head dims
    assert shapes[4] == [D, D] and shapes[5] == [D, D]                      # MLP hidden: 2D -> D
    assert {f["size"] for f in dyn.report()["frozen"]} == {D}                # only the residual stream
    # the pruned dynamic model still runs at other batch and sequence sizes
    y = _run(dyn.proto, 3, 7)
    assert next(iter(y.values())).shape == (3, 7, D)


def test_scale_read_from_the_shape_keeps_its_value(tmp_path):
    r = prune_model(tmp_path, attention(dynamic=True), ratio=0.5)
    div = next(n for n in r.proto.graph.node if n.op_type == "Div")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in r.proto.graph.initializer}
    assert np.isclose(float(inits[div.input[1]]), np.sqrt(DH))   # 1/sqrt(d) of the original d


def test_batch_and_sequence_stay_computed(tmp_path):
    r = prune_model(tmp_path, attention(dynamic=True), ratio=0.5)
    reshape = node(r.proto, "Reshape")
    producer = next(n for n in r.proto.graph.node if reshape.input[1] in n.output)
    assert producer.op_type == "Where"    # only the head-dimension element is set; B and T are read
    for b, t in ((1, 1), (2, 9)):
        assert next(iter(_run(r.proto, b, t).values())).shape == (b, t, D)


def test_conv1d_view_minus_one_by_last_size(tmp_path):
    """GPT-2's Conv1D: x.view(-1, x.size(-1)) @ W + b, then view(B, T, n)."""
    g = GraphBuilder(None)
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", D]))
    g.shapes["x"] = [1, T, D]
    s = Shapes(g, True)

    def conv1d(x, n):
        flat = g.op("Reshape", [x, g.op("Concat", [g.const(np.array([-1], I64)), s.dim(x, 2)], axis=0)])
        y = g.op("Gemm", [flat, g.weight([x_width(x), n]), g.const(np.zeros(n, np.float32))])
        return g.op("Reshape", [y, s.target(x, n)])

    def x_width(x):
        return 2 * D if x != "x" else D
    h = g.op("Gelu", [conv1d("x", 2 * D)]) if g.opset >= 20 else g.relu(conv1d("x", 2 * D))
    g.output(g.add("x", conv1d(h, D)))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    gemms = [n for n in r.proto.graph.node if n.op_type == "Gemm"]
    inits = {t.name: t for t in r.proto.graph.initializer}
    assert list(inits[gemms[0].input[1]].dims) == [D, D] and list(inits[gemms[1].input[1]].dims) == [D, D]
    assert next(iter(_run(r.proto, 2, 3).values())).shape == (2, 3, D)


def test_shape_constant_shared_by_two_reshapes(tmp_path):
    """One [-1, H, DH] constant feeds the q and k reshapes (dynamo exports share them): each use gets its
    own rewrite, and an unpruned reader keeps the original."""
    g = GraphBuilder(None)
    g.inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D]))
    g.shapes["x"] = [1, T, D]
    s = Shapes(g, True)
    shared = g.const(np.array([T, H, DH], I64))
    target = g.op("Concat", [s.dim("x", 0), shared], axis=0)
    q = g.op("Reshape", [g.matmul("x", D), target])
    k = g.op("Reshape", [g.matmul("x", D), target])
    fixed = g.op("Reshape", ["x", target])                       # the graph input: never pruned
    last = g.const(np.array([3], I64))
    g.output(g.op("ReduceSum", [g.op("Mul", [q, k]), last], keepdims=0))
    g.output(g.op("ReduceSum", [fixed, last], keepdims=0))
    r = prune_model(tmp_path, g.build(), ratio=0.5)
    assert any(x["removed_channels"] for x in r.report()["groups"])
    outs = _run(r.proto, 2, T)
    assert all(v.shape == (2, T, H) for v in outs.values())
