"""Tiny transformers as real ONNX graphs (random weights, fixed seed), for tests.

    decoder(norm="rms", spelled="primitives", gated=True, tied=True)   # Llama-like causal LM
    decoder(norm="layer", positions=True, tied=True)                   # GPT-2-like
    encoder(post_norm=True)                                            # BERT-like, last hidden state out

Inputs are ``input_ids [batch, seq]`` (int64, both dims symbolic); a decoder returns ``logits
[batch, seq, vocab]``, an encoder ``last_hidden_state [batch, seq, hidden]``. A norm is spelled as one
``LayerNormalization`` op (``spelled="op"``; RMSNorm as ``RMSNormalization`` from opset 23) or as the
primitive ops exporters write (``ReduceMean``, ``Sub``, ``Pow``, ``Add``, ``Sqrt``, ``Div``, ``Mul``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _G:
    def __init__(self, seed: int, opset: int):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset, self.n = [], [], opset, 0

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def const(self, v, p="c"):
        name = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(v), name))
        return name

    def w(self, shape, scale=None, p="w"):
        scale = 1.0 / np.sqrt(shape[0]) if scale is None else scale
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), p)

    def op(self, t, ins, p=None, **kw):
        out = self.name(p or t.lower())
        self.nodes.append(helper.make_node(t, list(ins), [out], name=self.name(t), **kw))
        return out

    def linear(self, x, din, dout, bias=True):
        y = self.op("MatMul", [x, self.w([din, dout])])
        if bias:
            y = self.op("Add", [y, self.const((self.rng.standard_normal(dout) * 0.1).astype(np.float32), "b")])
        return y

    def axes(self, op, x, axes, **kw):
        """Reduce ops take axes as an attribute before opset 18 and as an input from it."""
        if self.opset >= 18:
            return self.op(op, [x, self.const(np.array(axes, np.int64), "axes")], **kw)
        return self.op(op, [x], axes=axes, **kw)

    def norm(self, x, d, kind, spelled, eps=1e-5):
        scale = self.const(self.rng.uniform(0.5, 1.5, d).astype(np.float32), "gamma")
        bias = self.const((self.rng.standard_normal(d) * 0.1).astype(np.float32), "beta") if kind == "layer" else None
        if spelled == "op":
            if kind == "layer":
                return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=eps)
            return self.op("RMSNormalization", [x, scale], axis=-1, epsilon=eps)
        if kind == "layer":
            mean = self.axes("ReduceMean", x, [-1], keepdims=1)
            x = self.op("Sub", [x, mean])
        sq = self.op("Pow", [x, self.const(np.array(2.0, np.float32))])
        var = self.axes("ReduceMean", sq, [-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.const(np.array(eps, np.float32))])])
        y = self.op("Div", [x, std]) if kind == "layer" else self.op("Mul", [x, self.op("Reciprocal", [std])])
        y = self.op("Mul", [y, scale]) if kind == "layer" else self.op("Mul", [scale, y])
        return self.op("Add", [y, bias]) if bias else y

    def attention(self, x, d, heads, kv_heads, causal, bias):
        dh = d // heads
        q = self.linear(x, d, d, bias)
        k = self.linear(x, d, kv_heads * dh, bias)
        v = self.linear(x, d, kv_heads * dh, bias)

        def split(t, h):
            t = self.op("Reshape", [t, self.const(np.array([0, 0, h, dh], np.int64), "shape")])
            return self.op("Transpose", [t], perm=[0, 2, 1, 3])
        q, k, v = split(q, heads), split(k, kv_heads), split(v, kv_heads)
        if kv_heads != heads:  # grouped-query attention: repeat each KV head
            rep = heads // kv_heads

            def repeat(t):
                t = self.op("Unsqueeze", [t, self.const(np.array([2], np.int64), "axes")])
                t = self.op("Expand", [t, self.const(np.array([1, 1, rep, 1, 1], np.int64), "shape")])
                return self.op("Reshape", [t, self.const(np.array([0, heads, -1, dh], np.int64), "shape")])
            k, v = repeat(k), repeat(v)
        s = self.op("MatMul", [q, self.op("Transpose", [k], perm=[0, 1, 3, 2])])
        s = self.op("Mul", [s, self.const(np.array(1.0 / np.sqrt(dh), np.float32))])
        if causal:
            t = self.op("Gather", [self.op("Shape", [x]), self.const(np.array([1], np.int64), "i")], axis=0)
            tt = self.op("Concat", [t, t], axis=0)
            ones = self.op("ConstantOfShape", [tt], value=numpy_helper.from_array(np.ones(1, np.float32)))
            keep = self.op("Cast", [self.op("Trilu", [ones], upper=0)], to=TensorProto.BOOL)
            s = self.op("Where", [keep, s, self.const(np.array(-1e9, np.float32))])
        a = self.op("MatMul", [self.op("Softmax", [s], axis=-1), v])
        a = self.op("Transpose", [a], perm=[0, 2, 1, 3])
        a = self.op("Reshape", [a, self.const(np.array([0, 0, d], np.int64), "shape")])
        return self.linear(a, d, d, bias)

    def mlp(self, x, d, ffn, gated, bias):
        if gated:
            g = self.linear(x, d, ffn, bias)
            g = self.op("Mul", [g, self.op("Sigmoid", [g])])
            return self.linear(self.op("Mul", [g, self.linear(x, d, ffn, bias)]), ffn, d, bias)
        h = self.op("Relu", [self.linear(x, d, ffn, bias)])
        return self.linear(h, ffn, d, bias)

    def embed(self, ids, vocab, d, positions, max_pos=64):
        table = self.w([vocab, d], scale=0.5, p="embed")
        x = self.op("Gather", [table, ids], axis=0)
        if positions:
            pos = self.w([max_pos, d], scale=0.2, p="pos_embed")
            t = self.op("Gather", [self.op("Shape", [ids]), self.const(np.array(1, np.int64), "i")], axis=0)
            r = self.op("Range", [self.const(np.array(0, np.int64)), t, self.const(np.array(1, np.int64))])
            x = self.op("Add", [x, self.op("Gather", [pos, r], axis=0)])
        return x, table

    def model(self, out, width):
        g = helper.make_graph(self.nodes, "tiny", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                                 ["batch", "seq"])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", "seq", width])],
                              self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 10 if self.opset >= 23 else 8
        onnx.checker.check_model(m, full_check=True)
        return m


def decoder(*, vocab: int = 96, d: int = 32, heads: int = 4, kv_heads: int | None = None, layers: int = 2,
            ffn: int = 64, norm: str = "layer", spelled: str = "op", gated: bool = False, tied: bool = True,
            positions: bool = False, bias: bool = True, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """A pre-norm causal LM: embeddings, ``layers`` blocks of attention and MLP, final norm, LM head."""
    g = _G(seed, opset)
    x, table = g.embed("input_ids", vocab, d, positions)
    for _ in range(layers):
        x = g.op("Add", [x, g.attention(g.norm(x, d, norm, spelled), d, heads, kv_heads or heads, True, bias)])
        x = g.op("Add", [x, g.mlp(g.norm(x, d, norm, spelled), d, ffn, gated, bias)])
    x = g.norm(x, d, norm, spelled)
    if tied == "copy":   # tied in the source model, stored twice (torch's legacy exporter)
        E = next(numpy_helper.to_array(t) for t in g.inits if t.name == table)
        g.op("MatMul", [x, g.const(np.ascontiguousarray(E.T), "lm_head")])
    elif tied:
        g.op("MatMul", [x, g.op("Transpose", [table], perm=[1, 0])])
    else:
        g.op("MatMul", [x, g.w([d, vocab])])
    g.nodes[-1].output[0] = "logits"
    return g.model("logits", vocab)


def encoder(*, vocab: int = 96, d: int = 32, heads: int = 4, layers: int = 2, ffn: int = 64,
            spelled: str = "op", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """A post-norm (BERT-like) encoder returning its last hidden state."""
    g = _G(seed, opset)
    x, _ = g.embed("input_ids", vocab, d, True)
    x = g.norm(x, d, "layer", spelled)
    for _ in range(layers):
        x = g.norm(g.op("Add", [x, g.attention(x, d, heads, heads, False, True)]), d, "layer", spelled)
        x = g.norm(g.op("Add", [x, g.mlp(x, d, ffn, False, True)]), d, "layer", spelled)
    g.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="out"))
    return g.model("last_hidden_state", d)
