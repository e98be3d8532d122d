"""Rotate (and slice) the residual stream: writers ``W Q``, readers ``Q^T diag(scale) W``, norms -> RMSNorm.

``Q`` is ``[d, d']`` with orthonormal columns. With ``d' = d`` (RMSNorm models) or ``d' = d - 1``
and ``Q`` orthogonal to the all-ones vector (LayerNorm models: the component a LayerNorm removes is
dropped instead of centring every writer), the rotated model computes exactly what the original
does. With fewer columns it drops the stream's remaining directions (slicing).

Every norm becomes a plain RMSNorm of the ``d'``-wide stream (``RMSNormalization`` from opset 23,
``x / sqrt(mean(x*x) + eps')`` below) with ``eps' = eps * d / d'``; its scale, its bias and the factor
``sqrt(d / d')`` that restores the original normalisation go into the linear layers it feeds. A tied
LM head (``MatMul(y, Transpose(E))`` over the same table ``E`` the embedding gathers from) keeps one
table ``E Q`` for both and gets a small ``d' x d'`` matrix ``sqrt(d/d') Q^T diag(scale) Q`` before it,
plus, for LayerNorm models, the all-ones part of ``E`` (one number per vocabulary entry) and the norm's
bias (``bias E^T``), so vocabulary rows stay whole and shared.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import ir
from .norms import constants
from .stream import Stream, attr

F32 = np.float32


def random_rotation(d: int, kind: str, seed: int = 0) -> np.ndarray:
    """A random ``[d, d]`` orthogonal matrix, or ``[d, d-1]`` orthogonal to the ones vector (``layer``)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((d, d if kind == "rms" else d - 1))
    if kind != "rms":
        g -= g.mean(axis=0, keepdims=True)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))


def apply(proto: onnx.ModelProto, stream: Stream, Q: np.ndarray | list[np.ndarray], *,
          fits: dict[int, np.ndarray] | None = None, rms_names: dict[int, str] | None = None) -> onnx.ModelProto:
    """A new model: ``proto`` with its stream rotated by ``Q`` (``proto`` is not modified); a list gives
    each segment of the stream (:attr:`Stream.segments`) its own basis, all of the same width.

    Each norm's output is rebuilt from its RMSNorm ``r`` (width ``d'``) as ``y = r A + c``: exactly
    ``A = sqrt(d/d') Q^T diag(scale)``, ``c = bias``; ``fits`` gives ``[A; c]`` (``[d'+1, d]``) fitted by
    least squares instead (see :func:`slicing.refit`). ``rms_names`` is filled with each norm's ``r``."""
    Qs = list(Q) if isinstance(Q, (list, tuple)) else [Q] * stream.segments
    Q = Qs[0]
    d, dn = Q.shape
    if d != stream.width:
        raise ValueError(f"Q is {Q.shape}, the stream is {stream.width} wide")
    g = proto.graph
    consts = constants(g)
    arrays: dict[str, np.ndarray] = {}
    taken = {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}

    def fresh(base: str) -> str:
        return ir.fresh_name(base, taken)

    def value(name: str) -> np.ndarray:
        return ir.tensor_to_array(consts[name]).astype(np.float64)

    def new_const(base: str, a: np.ndarray) -> str:
        name = fresh(base)
        arrays[name] = np.ascontiguousarray(a, dtype=F32)
        return name

    nodes = {n.name: n for n in g.node}
    new_nodes = [n for n in g.node]  # edited in place on copies below
    copies: dict[str, onnx.NodeProto] = {}

    def node(name: str) -> onnx.NodeProto:
        if name not in copies:
            c = onnx.NodeProto()
            c.CopyFrom(nodes[name])
            copies[name] = c
        return copies[name]

    # writers: their last-axis values rotate (W Q); a table read by a tied head rotates once
    rotated: dict[str, str] = {}
    basis_of: dict[str, np.ndarray] = {}   # a table -> the basis its rows were rotated into
    for w in stream.writers:
        n = node(w.node)
        Q = Qs[stream.segment[w.target]]
        if w.op == "Add":
            c = value(w.tensor)
            c = np.broadcast_to(c, c.shape[:-1] + (d,)) @ Q
            idx = list(n.input).index(w.tensor)
            n.input[idx] = new_const(f"{w.tensor}.rot", c)
        elif w.op == "Gather":
            if w.tensor not in rotated:
                rotated[w.tensor] = new_const(f"{w.tensor}.rot", value(w.tensor) @ Q)
                basis_of[w.tensor] = Q
            n.input[0] = rotated[w.tensor]
        elif w.op == "MatMul" or (w.op == "Gemm" and not w.rows):
            n.input[1] = new_const(f"{w.tensor}.rot", value(w.tensor) @ Q)
        else:   # Gemm with transB: weight [d, k]
            n.input[1] = new_const(f"{w.tensor}.rot", Q.T @ value(w.tensor))

    s = np.sqrt(d / dn)

    def affine(i: int) -> tuple[np.ndarray, np.ndarray]:
        """(A [d', d], c [d]): norm ``i``'s output in the original basis from its RMSNorm."""
        if fits is not None and i in fits:
            return fits[i][:dn], fits[i][dn]
        nm = stream.norms[i]
        return s * Qs[stream.norm_segments(i)[0]].T * nm.scale[None, :], nm.bias

    extra: list[tuple[str, str, list[onnx.NodeProto]]] = []   # ("before" | "after", node name, nodes)
    for j, r in enumerate(stream.readers):
        A, c = affine(r.norm)
        n = node(r.node)
        if r.tensor in stream.tied:
            _tied_head(n, r, A, c, basis_of[r.tensor], stream.kind, value(r.tensor), rotated[r.tensor], node,
                       new_const, fresh, extra)
            continue
        W = value(r.tensor)
        if r.rows:   # [k, d]
            Wn = W @ A.T
            b = W @ c
        else:        # [d, k]
            Wn = A @ W
            b = c @ W
        if r.via:    # MatMul(y, Transpose(W)): read the folded weight directly
            n.input[1] = new_const(f"{r.tensor}.r{j}", Wn.T)
        else:
            n.input[1] = new_const(f"{r.tensor}.r{j}", Wn)
        if np.any(b != 0):
            _add_bias(n, b, consts, value, new_const, fresh, extra, g)

    # norms: the region's nodes go, an RMSNorm of the rotated stream takes their place
    drop = {name for nm in stream.norms for name in nm.nodes}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    rename: dict[str, dict[str, str]] = {}   # node -> {norm output: what it reads instead}
    default: dict[str, str] = {}
    for i, nm in enumerate(stream.norms):
        uses = [u for u in stream.uses if u.norm == i]
        if not uses and i not in stream.outputs:
            extra.append(("before", nm.nodes[0], _rms(nm.x, nm.y, nm.eps * d / dn, dn, opset, new_const, fresh)))
            if rms_names is not None:
                rms_names[i] = nm.y
            continue
        r = fresh(f"{nm.y}.rms")
        if rms_names is not None:
            rms_names[i] = r
        ns = _rms(nm.x, r, nm.eps * d / dn, dn, opset, new_const, fresh)
        made = {}
        seg_out = stream.norm_segments(i)[1]
        A, c = affine(i)
        for kind in sorted({u.kind for u in uses} | ({"full"} if i in stream.outputs else set())):
            if kind == "stream":   # the rotated stream again: (r A + c) Q_out
                Qo = Qs[seg_out]
                mat, bias = A @ Qo, c @ Qo
            else:                  # the original basis: r A + c
                mat, bias = A, c
            out = nm.y if kind == "full" and i in stream.outputs else fresh(f"{nm.y}.{kind}")
            lin = fresh(f"{nm.y}.{kind}_lin") if np.any(bias != 0) else out
            ns.append(helper.make_node("MatMul", [r, new_const(f"{nm.y}.{kind}_mat", mat)], [lin],
                                       name=fresh(f"{nm.y}.{kind}_matmul")))
            if lin != out:
                ns.append(helper.make_node("Add", [lin, new_const(f"{nm.y}.{kind}_bias", bias)], [out],
                                           name=fresh(f"{nm.y}.{kind}_add")))
            made[kind] = out
        extra.append(("before", nm.nodes[0], ns))
        default[nm.y] = r     # other readers (a Shape of the batch and sequence dims) read the RMSNorm
        for u in uses:
            rename.setdefault(u.node, {})[nm.y] = made[u.kind]
        for rd in stream.readers:
            if rd.norm == i:
                rename.setdefault(rd.node, {})[nm.y] = r
                if rd.tensor in stream.tied:
                    rename.setdefault(f"{rd.node}.mix", {})[nm.y] = r

    where: dict[tuple[str, str], list[onnx.NodeProto]] = {}
    for side, anchor, ns in extra:
        where.setdefault((side, anchor), []).extend(ns)
    for n in g.node:   # nodes whose inputs change are copies: ``proto`` stays as it is
        if n.name in rename or (n.name not in drop and any(i in default for i in n.input)):
            node(n.name)
    out_nodes = []
    for n in new_nodes:
        out_nodes.extend(where.get(("before", n.name), []))
        if n.name not in drop:
            out_nodes.append(copies.get(n.name, n))
        out_nodes.extend(where.get(("after", n.name), []))
    produced = {o for n in out_nodes for o in n.output}
    for n in out_nodes:
        for k, i in enumerate(n.input):
            if i in rename.get(n.name, {}):
                n.input[k] = rename[n.name][i]
            elif i in default and i not in produced:
                n.input[k] = default[i]

    m = onnx.ModelProto()
    m.ir_version, m.producer_name, m.producer_version = proto.ir_version, proto.producer_name, proto.producer_version
    m.domain, m.model_version, m.doc_string = proto.domain, proto.model_version, proto.doc_string
    m.opset_import.extend(proto.opset_import)
    m.metadata_props.extend(proto.metadata_props)
    ng = m.graph
    ng.name = g.name
    ng.input.extend(g.input)
    ng.output.extend(g.output)
    ng.node.extend(out_nodes)
    ng.initializer.extend(numpy_helper.from_array(a, k) for k, a in arrays.items())
    _prune_dead(ng, {t.name: t for t in g.initializer})
    if opset < 23 and not any(o.domain in ("", "ai.onnx") for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid("", opset))
    return m


def _rms(x, y, eps, width, opset, new_const, fresh) -> list[onnx.NodeProto]:
    if opset >= 23:
        return [helper.make_node("RMSNormalization", [x, new_const(f"{y}.ones", np.ones(width))], [y],
                                 name=fresh(f"{y}.rms"), axis=-1, epsilon=float(eps))]
    sq, ms, ve, sd = (fresh(f"{y}.{k}") for k in ("sq", "ms", "ve", "sd"))
    if opset >= 18:
        axes = fresh(f"{y}.axes")
        mean = [helper.make_node("Constant", [], [axes], name=fresh(f"{y}.axesc"),
                                 value=numpy_helper.from_array(np.array([-1], np.int64))),
                helper.make_node("ReduceMean", [sq, axes], [ms], name=fresh(f"{y}.mean"), keepdims=1)]
    else:
        mean = [helper.make_node("ReduceMean", [sq], [ms], name=fresh(f"{y}.mean"), axes=[-1], keepdims=1)]
    return ([helper.make_node("Mul", [x, x], [sq], name=fresh(f"{y}.square"))] + mean +
            [helper.make_node("Add", [ms, new_const(f"{y}.eps", np.array(eps))], [ve], name=fresh(f"{y}.addeps")),
             helper.make_node("Sqrt", [ve], [sd], name=fresh(f"{y}.sqrt")),
             helper.make_node("Div", [x, sd], [y], name=fresh(f"{y}.div"))])


def _add_bias(n, b, consts, value, new_const, fresh, extra, g) -> None:
    """Add ``b`` to the reader's output: into the bias it already has, or a new Add after it."""
    if n.op_type == "Gemm":
        beta = float(attr(n, "beta", 1.0))
        if len(n.input) > 2 and n.input[2] in consts and beta != 0:
            n.input[2] = new_const(f"{n.input[2]}.fold", value(n.input[2]) + b / beta)
            return
        if len(n.input) < 3 or not n.input[2]:
            while len(n.input) < 3:
                n.input.append("")
            n.input[2] = new_const(f"{n.name}.fold_bias", b)
            for a in n.attribute:
                if a.name == "beta":
                    a.f = 1.0
            return
    out = n.output[0]
    pre = fresh(f"{out}.prebias")
    n.output[0] = pre
    add = helper.make_node("Add", [pre, new_const(f"{n.name}.fold_bias", b)], [out], name=fresh(f"{n.name}.bias"))
    extra.append(("after", n.name, [add]))


def _tied_head(n, r, A, c, QE, kind, E, E_rot, node, new_const, fresh, extra) -> None:
    """A head that reads the embedding table: ``MatMul(y M, (E QE)^T)`` plus what ``QE`` drops of ``E``
    (the norm's output is ``y A + c`` in the original basis)."""
    y = n.input[0]
    y2 = fresh(f"{y}.mixed")
    M = A @ QE
    extra.append(("before", r.node, [helper.make_node("MatMul", [y, new_const(f"{r.tensor}.head_mix", M)], [y2],
                                                      name=f"{n.name}.mix")]))
    n.input[0] = y2
    if r.via:
        node(r.via).input[0] = E_rot
    elif r.copy and n.op_type == "MatMul":   # a copy of the table: read the table itself, transposed
        t = fresh(f"{E_rot}.T")
        extra.append(("before", r.node, [helper.make_node("Transpose", [E_rot], [t], name=fresh(f"{n.name}.tie"),
                                                          perm=[1, 0])]))
        n.input[1] = t
    else:       # Gemm with transB, or a copy read that way
        n.input[1] = E_rot
        if r.copy:
            keep = [a for a in n.attribute if a.name != "transB"]
            del n.attribute[:]
            n.attribute.extend(keep + [helper.make_attribute("transB", 1)])
    post, out = [], n.output[0]
    cur = fresh(f"{out}.main")
    n.output[0] = cur
    if kind == "layer":  # E's all-ones component, dropped from E Q: (y . s Q^T gamma) * mean(E, axis=1)
        dot, prod, nxt = fresh(f"{out}.ones_dot"), fresh(f"{out}.ones_term"), fresh(f"{out}.with_ones")
        post += [helper.make_node("MatMul", [y, new_const(f"{r.tensor}.ones_dir", A.sum(axis=1)[:, None])],
                                  [dot], name=fresh(f"{n.name}.ones_dot")),
                 helper.make_node("Mul", [dot, new_const(f"{r.tensor}.row_mean", E.mean(axis=1))], [prod],
                                  name=fresh(f"{n.name}.ones_mul")),
                 helper.make_node("Add", [cur, prod], [nxt], name=fresh(f"{n.name}.ones_add"))]
        cur = nxt
    if np.any(c != 0):
        nxt = fresh(f"{out}.with_bias")
        post.append(helper.make_node("Add", [cur, new_const(f"{r.tensor}.head_bias", E @ c)], [nxt],
                                     name=fresh(f"{n.name}.bias_add")))
        cur = nxt
    post.append(helper.make_node("Identity", [cur], [out], name=fresh(f"{n.name}.out")))
    extra.append(("after", r.node, post))


def _prune_dead(g: onnx.GraphProto, old: dict[str, onnx.TensorProto]) -> None:
    """Drop nodes nothing reads, then bring back the original initializers still read."""
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        live = [n for n in g.node if any(o in used for o in n.output if o)]
        if len(live) == len(g.node):
            break
        del g.node[:]
        g.node.extend(live)
    used = {i for n in g.node for i in n.input} | outputs
    have = {t.name for t in g.initializer}
    g.initializer.extend(t for name, t in old.items() if name in used and name not in have)
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
