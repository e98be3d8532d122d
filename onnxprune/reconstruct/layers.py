"""Weight layers seen as grouped linear maps: one rule per op type, in one table.

Every supported layer is read as ``G`` independent maps ``y_g = x_g @ W[g].T + b_g``
with ``W`` float64 ``[G, Cout/G, K]`` (``K`` = input channels of a group times kernel
elements, columns ordered (channel, *kernel)) and ``b`` ``[Cout]``. A rule knows how to
read that form from a graphsurgeon node, write it back, build the feature rows ``x_g``
from the layer's input tensor and pick the matching target rows from its output:

- Conv: im2col patches (``taps.conv_patches``), ``W.reshape(G, Cout/G, -1)``.
- ConvTranspose: the adjoint of a Conv, expressed exactly as a stride-1 Conv with the
  flipped, transposed kernel over the zero-upsampled, re-padded input.
- Gemm: ``alpha * B`` (transposed as needed), ``beta * C``; written back with alpha = beta = 1.
- MatMul with a constant 2-D right operand: rows of the flattened leading axes; a bias
  goes into a following ``Add`` of a constant vector, or into a new ``Add``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..runtime import taps


def const_input(node: gs.Node, i: int) -> gs.Constant | None:
    """The ``i``-th input of ``node`` if it is present and constant."""
    if i < len(node.inputs) and isinstance(node.inputs[i], gs.Constant) and node.inputs[i].name != "":
        return node.inputs[i]
    return None


def has_input(node: gs.Node, i: int) -> bool:
    return i < len(node.inputs) and node.inputs[i].name != ""


def fresh_name(graph: gs.Graph, base: str) -> str:
    names = graph.tensors().keys()
    name, k = base, 1
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return name


def set_vector(graph: gs.Graph, node: gs.Node, i: int, values: np.ndarray, suffix: str) -> None:
    """Put ``values`` at input ``i`` of ``node``: in place if the constant is not shared, else a new one."""
    c = const_input(node, i)
    if c is not None and len(c.outputs) == 1:
        c.values = values.astype(c.values.dtype)
        return
    new = gs.Constant(fresh_name(graph, f"{node.name}.{suffix}"), values)
    while len(node.inputs) < i:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == i:
        node.inputs.append(new)
    else:
        node.inputs[i] = new


@dataclass
class Linear:
    """One layer as grouped linear maps, plus what a refit needs to rebuild rows."""

    node: gs.Node
    rule: "Rule"
    W: np.ndarray          # float64 [G, Cout/G, K]
    b: np.ndarray          # float64 [Cout]
    kernel: int            # kernel elements per input channel (1 for Gemm/MatMul)
    dtype: np.dtype        # the weight's storage dtype

    @property
    def groups(self) -> int:
        return self.W.shape[0]

    @property
    def cout(self) -> int:
        return self.W.shape[0] * self.W.shape[1]

    @property
    def cin(self) -> int:
        return self.W.shape[0] * self.W.shape[2] // self.kernel

    def dense(self) -> np.ndarray:
        """Kernel-summed weights [Cout, Cin], zero between groups (for bias compensation)."""
        g, co, k = self.W.shape
        ci = k // self.kernel
        m = np.zeros((g * co, g * ci))
        sums = self.W.reshape(g, co, ci, self.kernel).sum(-1)
        for j in range(g):
            m[j * co:(j + 1) * co, j * ci:(j + 1) * ci] = sums[j]
        return m

    def signatures(self, kept_in: np.ndarray | None = None) -> list[bytes]:
        """Per output channel: its weights over ``kept_in`` (all if None) and bias, as bytes."""
        g, co, k = self.W.shape
        ci = k // self.kernel
        w = self.W.reshape(g, co, ci, self.kernel)
        sig = []
        for o in range(g * co):
            j = o // co
            if kept_in is None:
                cols = slice(None)
            else:
                cols = kept_in[(kept_in >= j * ci) & (kept_in < (j + 1) * ci)] - j * ci
            sig.append(w[j, o % co, cols].tobytes() + self.b[o].tobytes())
        return sig


class Rule:
    """How one op type maps to :class:`Linear`; subclasses fill in the four steps."""

    op = ""
    channel_axis = 1       # channel axis of the layer's input and output tensors

    def check(self, node: gs.Node) -> str | None:
        """Why this node cannot be refit, or None."""
        w = const_input(node, 1)
        if w is None:
            return "weight is not a constant"
        if w.values.dtype.kind != "f":
            return f"weight dtype {w.values.dtype} is not floating point"
        if has_input(node, 2) and const_input(node, 2) is None:
            return "bias is not a constant"
        return None

    def read(self, node: gs.Node) -> Linear:
        raise NotImplementedError

    def write(self, graph: gs.Graph, lin: Linear, W: np.ndarray, b: np.ndarray) -> None:
        raise NotImplementedError

    def positions(self, y: np.ndarray) -> int:
        """Rows per sample (output positions) of one layer call, from its output."""
        return int(np.prod(y.shape[2:])) if self.channel_axis == 1 else int(np.prod(y.shape[1:-1]))

    def spread(self, x: np.ndarray, y: np.ndarray) -> float:
        """Output positions one input position's kernel-summed weight is spread over, inverted."""
        return 1.0

    def features(self, lin: Linear, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[G, R, K] feature rows for the flat output positions ``rows``."""
        return x.reshape(-1, x.shape[-1])[rows][None]

    def targets(self, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[R, Cout] target rows for the flat output positions ``rows``."""
        if self.channel_axis == 1:
            n, c = y.shape[:2]
            s, p = np.divmod(rows, int(np.prod(y.shape[2:])))
            return y.reshape(n, c, -1)[s, :, p]
        return y.reshape(-1, y.shape[-1])[rows]

    def bias_of(self, node: gs.Node, cout: int) -> np.ndarray:
        c = const_input(node, 2)
        if c is None:
            return np.zeros(cout)
        return np.broadcast_to(c.values.astype(np.float64).reshape(-1), (cout,)).copy()


class ConvRule(Rule):
    op = "Conv"

    def read(self, node):
        w = const_input(node, 1).values
        g = taps.conv_attrs(node.attrs, w.shape)["group"]
        kernel = int(np.prod(w.shape[2:]))
        W = w.astype(np.float64).reshape(g, w.shape[0] // g, -1)
        return Linear(node, self, W, self.bias_of(node, w.shape[0]), kernel, w.dtype)

    def write(self, graph, lin, W, b):
        w = const_input(lin.node, 1)
        w.values = W.reshape(w.values.shape).astype(lin.dtype)
        set_vector(graph, lin.node, 2, b.astype(lin.dtype), "bias")

    def features(self, lin, x, rows):
        a = taps.conv_attrs(lin.node.attrs, const_input(lin.node, 1).values.shape)
        return taps.conv_patches(x, a["kernel_shape"], a["strides"], a["pads"], a["dilations"], a["group"],
                                      a["auto_pad"], rows=rows)


class ConvTransposeRule(Rule):
    op = "ConvTranspose"

    def check(self, node):
        a = node.attrs
        if "output_shape" in a:
            return "output_shape attribute is not supported"
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            return "auto_pad is not supported"
        return super().check(node)

    def read(self, node):
        w = const_input(node, 1).values
        g = int(node.attrs.get("group", 1))
        ci, co, ks = w.shape[0] // g, w.shape[1], w.shape[2:]
        kernel = int(np.prod(ks))
        flipped = np.flip(w.astype(np.float64), axis=tuple(range(2, w.ndim)))
        W = flipped.reshape(g, ci, co, kernel).transpose(0, 2, 1, 3).reshape(g, co, ci * kernel)
        return Linear(node, self, W, self.bias_of(node, g * co), kernel, w.dtype)

    def write(self, graph, lin, W, b):
        w = const_input(lin.node, 1)
        shape = w.values.shape
        g, co = W.shape[:2]
        ci = shape[0] // g
        back = W.reshape(g, co, ci, lin.kernel).transpose(0, 2, 1, 3).reshape(shape)
        w.values = np.ascontiguousarray(np.flip(back, axis=tuple(range(2, len(shape))))).astype(lin.dtype)
        set_vector(graph, lin.node, 2, b.astype(lin.dtype), "bias")

    def spread(self, x, y):
        return float(np.prod(x.shape[2:]) / np.prod(y.shape[2:]))

    def features(self, lin, x, rows):
        shape = const_input(lin.node, 1).values.shape
        nd = x.ndim - 2
        a = lin.node.attrs
        k = list(a.get("kernel_shape", shape[2:]))
        s = list(a.get("strides", [1] * nd))
        d = list(a.get("dilations", [1] * nd))
        p = list(a.get("pads", [0] * (2 * nd)))
        op = list(a.get("output_padding", [0] * nd))
        up = np.zeros(x.shape[:2] + tuple((x.shape[2 + i] - 1) * s[i] + 1 for i in range(nd)), x.dtype)
        up[(slice(None), slice(None)) + tuple(slice(None, None, s[i]) for i in range(nd))] = x
        begin = [d[i] * (k[i] - 1) - p[i] for i in range(nd)]
        end = [d[i] * (k[i] - 1) - p[nd + i] + op[i] for i in range(nd)]
        crop = tuple(slice(max(0, -begin[i]), up.shape[2 + i] - max(0, -end[i])) for i in range(nd))
        up = up[(slice(None), slice(None)) + crop]
        pads = [max(0, v) for v in begin] + [max(0, v) for v in end]
        return taps.conv_patches(up, k, [1] * nd, pads, d, int(a.get("group", 1)), rows=rows)


class GemmRule(Rule):
    op = "Gemm"
    channel_axis = -1

    def check(self, node):
        if int(node.attrs.get("transA", 0)):
            return "transA=1 is not supported"
        w, c = const_input(node, 1), const_input(node, 2)
        cout = None if w is None else w.values.shape[0 if int(node.attrs.get("transB", 0)) else 1]
        if c is not None and c.values.size not in (1, cout):
            return "bias C that is not a vector is not supported"
        return super().check(node)

    def read(self, node):
        w = const_input(node, 1).values
        a = node.attrs
        W = float(a.get("alpha", 1.0)) * (w if int(a.get("transB", 0)) else w.T).astype(np.float64)
        b = float(a.get("beta", 1.0)) * self.bias_of(node, W.shape[0])
        return Linear(node, self, W[None], b, 1, w.dtype)

    def write(self, graph, lin, W, b):
        node = lin.node
        w = const_input(node, 1)
        w.values = (W[0] if int(node.attrs.get("transB", 0)) else W[0].T).astype(lin.dtype)
        node.attrs["alpha"] = 1.0
        node.attrs["beta"] = 1.0
        set_vector(graph, node, 2, b.astype(lin.dtype), "bias")


class MatMulRule(Rule):
    op = "MatMul"
    channel_axis = -1

    def check(self, node):
        w = const_input(node, 1)
        if w is not None and w.values.ndim != 2:
            return "only a constant 2-D right operand is supported"
        return super().check(node)

    def read(self, node):
        w = const_input(node, 1).values
        return Linear(node, self, w.T.astype(np.float64)[None], np.zeros(w.shape[1]), 1, w.dtype)

    def write(self, graph, lin, W, b):
        node = lin.node
        const_input(node, 1).values = W[0].T.astype(lin.dtype)
        if not np.any(b):
            return
        out = node.outputs[0]
        add = _bias_add(graph, out, b.shape[0])
        if add is not None:
            c = next(t for t in add.inputs if isinstance(t, gs.Constant))
            c.values = (c.values + b.reshape(c.values.shape)).astype(c.values.dtype)
            return
        mid = gs.Variable(fresh_name(graph, f"{out.name}.matmul"), dtype=out.dtype, shape=out.shape)
        node.outputs[0] = mid
        bias = gs.Constant(fresh_name(graph, f"{node.name}.bias"), b.astype(lin.dtype))
        graph.nodes.append(gs.Node("Add", fresh_name(graph, f"{node.name}.bias_add"), inputs=[mid, bias],
                                   outputs=[out]))


def _bias_add(graph: gs.Graph, out: gs.Variable, cout: int) -> gs.Node | None:
    """The single Add consuming ``out`` with an unshared constant bias vector of ``cout``, if any."""
    if len(out.outputs) != 1 or out in graph.outputs:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    consts = [t for t in add.inputs if isinstance(t, gs.Constant)]
    if len(consts) != 1 or len(consts[0].outputs) != 1:
        return None
    v = consts[0].values
    if v.dtype.kind != "f" or v.size != cout or (v.ndim and v.shape[-1] != cout):
        return None
    return add


def match_rows(original: list[bytes], pruned: list[bytes]) -> np.ndarray | None:
    """Index into ``original`` of each of ``pruned`` (an order-preserving subset), or None."""
    out, j = [], 0
    for sig in pruned:
        while j < len(original) and original[j] != sig:
            j += 1
        if j == len(original):
            return None
        out.append(j)
        j += 1
    return np.asarray(out, dtype=np.int64)


LINEAR_FORMS: dict[str, Rule] = {r.op: r for r in (ConvRule(), ConvTransposeRule(), GemmRule(), MatMulRule())}


def linear(node: gs.Node) -> tuple[Linear | None, str]:
    """``node`` as a :class:`Linear`, or None and the reason it cannot be one."""
    rule = LINEAR_FORMS.get(node.op)
    if rule is None:
        return None, f"{node.op} has no reconstruction rule"
    reason = rule.check(node)
    if reason:
        return None, reason
    return rule.read(node), ""
