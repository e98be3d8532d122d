"""Random valid CNN-like graphs for property testing: prune -> verified against the masked original.

``random_model(seed)`` grows a graph from a pool of NCHW tensors by applying
randomly chosen blocks (convolutions of every kind, norms, activations,
residual Add/Mul, Concat, Split, Slice, pooling, Resize, Pad, NHWC detours
with MatMul, channel shuffle, squeeze-excitation, flatten heads) with random
sizes, and ends in one or two classifier heads.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import GraphBuilder


class _Gen:
    def __init__(self, seed: int):
        self.r = np.random.default_rng(seed)
        c0 = int(self.r.choice([1, 3, 4]))
        hw = int(self.r.choice([6, 8, 12, 16]))
        self.g = GraphBuilder("x", [1, c0, hw, hw], seed=seed, dynamic_batch=bool(self.r.random() < 0.3))
        self.pool: list[str] = ["x"]

    # ------------------------------------------------------------ helpers
    def shape(self, t):
        return self.g.shape(t)

    def pick(self, pred=lambda s: True):
        cands = [t for t in self.pool if pred(self.shape(t))]
        return cands[int(self.r.integers(len(cands)))] if cands else None

    def ch(self):
        return int(self.r.choice([2, 3, 4, 6, 8, 12, 16]))

    def push(self, t):
        self.pool.append(t)
        return t

    # ------------------------------------------------------------ blocks
    def conv(self):
        x = self.pick()
        s = self.shape(x)
        cin, hw = s[1], s[2]
        kind = self.r.choice(["plain", "depthwise", "grouped", "pointwise"])
        stride = 2 if hw >= 6 and self.r.random() < 0.25 else 1
        if kind == "depthwise":
            y = self.g.conv(x, cin * int(self.r.choice([1, 2])), k=3, stride=stride, group=cin)
        elif kind == "grouped" and cin % 2 == 0:
            y = self.g.conv(x, 2 * int(self.r.choice([1, 2, 3])), k=3, stride=stride, group=2)
        else:
            k = 1 if kind == "pointwise" else int(self.r.choice([1, 3]))
            y = self.g.conv(x, self.ch(), k=k, stride=stride, bias=bool(self.r.random() < 0.7))
        if self.r.random() < 0.5:
            y = self.g.bn(y)
        return self.push(self.act(y))

    def act(self, y):
        op = self.r.choice(["Relu", "Sigmoid", "HardSwish", "LeakyRelu", "Tanh", None])
        return self.g.op(str(op), [y]) if op else y

    def residual(self):
        x = self.pick()
        s = self.shape(x)
        y = self.g.conv(x, s[1], k=int(self.r.choice([1, 3])))
        op = "Add" if self.r.random() < 0.7 else "Mul"
        return self.push(self.act(self.g.op(op, [x, y])))

    def concat(self):
        x = self.pick()
        hw = self.shape(x)[2:]
        y = self.pick(lambda s: s[2:] == hw)
        return self.push(self.g.concat([x, y]))

    def split(self):
        x = self.pick(lambda s: s[1] >= 3)
        if x is None:
            return self.conv()
        c = self.shape(x)[1]
        a = int(self.r.integers(1, c))
        outs = self.g.op("Split", [x, self.g.const(np.array([a, c - a], np.int64))], n_out=2, axis=1)
        self.g.shapes[outs[0]] = [1, a] + self.shape(x)[2:]
        self.g.shapes[outs[1]] = [1, c - a] + self.shape(x)[2:]
        self.push(outs[int(self.r.integers(2))])
        return outs[0]

    def slice(self):
        x = self.pick(lambda s: s[1] >= 3)
        if x is None:
            return self.conv()
        c = self.shape(x)[1]
        a = int(self.r.integers(0, c - 1))
        b = int(self.r.integers(a + 1, c + 1))
        one = self.g.const(np.array([1], np.int64))
        return self.push(self.g.op("Slice", [x, self.g.const(np.array([a], np.int64)),
                                             self.g.const(np.array([b], np.int64)), one]))

    def pool_op(self):
        x = self.pick(lambda s: s[2] >= 4)
        if x is None:
            return self.conv()
        return self.push(self.g.maxpool(x) if self.r.random() < 0.5 else self.g.avgpool(x))

    def resize_pad(self):
        x = self.pick(lambda s: s[2] <= 8)
        if x is None:
            return self.conv()
        if self.r.random() < 0.5:
            return self.push(self.g.op("Resize", [x, "", self.g.const(np.array([1, 1, 2, 2], np.float32))],
                                       mode="nearest"))
        return self.push(self.g.op("Pad", [x, self.g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]))

    def nhwc_dense(self):
        x = self.pick()
        y = self.g.transpose(x, [0, 2, 3, 1])
        y = self.g.matmul(y, self.ch(), bias=bool(self.r.random() < 0.5))
        return self.push(self.act(self.g.transpose(y, [0, 3, 1, 2])))

    def shuffle(self):
        x = self.pick(lambda s: s[1] % 2 == 0)
        if x is None:
            return self.conv()
        n, c, h, w = self.shape(x)
        y = self.g.reshape(x, [1, 2, c // 2, h, w])
        y = self.g.transpose(y, [0, 2, 1, 3, 4])
        return self.push(self.g.reshape(y, [1, c, h, w]))

    def se(self):
        x = self.pick()
        c = self.shape(x)[1]
        s = self.g.relu(self.g.conv(self.g.gap(x), max(1, c // 2), k=1))
        s = self.g.op("Sigmoid", [self.g.conv(s, c, k=1)])
        return self.push(self.g.mul(x, s))

    BLOCKS = ("conv", "conv", "conv", "residual", "concat", "split", "slice", "pool_op", "resize_pad",
              "nhwc_dense", "shuffle", "se")

    def head(self, x):
        s = self.shape(x)
        if s[2] * s[3] <= 16 and self.r.random() < 0.5:
            y = self.g.flatten(x)
        else:
            y = self.g.flatten(self.g.gap(x))
        if self.r.random() < 0.5:
            y = self.g.relu(self.g.gemm(y, self.ch()))
        return self.g.output(self.g.gemm(y, int(self.r.choice([2, 5, 10]))))

    def build(self, n_blocks: int) -> onnx.ModelProto:
        self.conv()
        for _ in range(n_blocks):
            getattr(self, str(self.r.choice(self.BLOCKS)))()
        self.head(self.pool[-1])
        if self.r.random() < 0.3 and len(self.pool) > 3:
            self.head(self.pool[len(self.pool) // 2])
        return self.g.build()


def random_model(seed: int, n_blocks: int | None = None) -> onnx.ModelProto:
    """A random valid model; the same seed always gives the same model."""
    gen = _Gen(seed)
    return gen.build(int(gen.r.integers(3, 12)) if n_blocks is None else n_blocks)
