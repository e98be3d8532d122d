"""Constant folding before the analysis: nodes whose inputs are all constants become constants.

Some exporters compute per-channel constants at run time: paddle2onnx adds conv biases
as ``Add(conv, Reshape(bias, shape))`` and casts constant shape pieces with ``Cast``. The
op rules slice constants only, so such a bias looks like a run-time tensor and freezes
its channels. :func:`fold_constants` evaluates those nodes once, in onnxruntime (the
kernels that run the model, so the values are the ones the model computes), and stores
the results as initializers under the same tensor names.

Only small results are folded, and a constant that other nodes still read stays as it
is for them: folding never duplicates a large weight, never changes what another user
of a shared constant sees, never decompresses stored weights (a result bigger than its
inputs, such as float16 weights cast to float32, stays computed), and leaves
quantization, random ops and graph outputs alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import canonical, ir, runtime

TINY = 64                # elements: shape arithmetic, always foldable
SMALL = 1 << 14          # elements: foldable even next to a shared input (a copy this small is harmless)
LIMIT = 1 << 22          # elements: never fold a larger result or read a larger input
NEVER = {"Constant", "Identity",    # Identity(constant) is how torch shares weights: ir keeps it shared
         "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
         "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def fold_model(model: ir.Model) -> ir.Model:
    """``model`` with its constant subgraphs folded and its channel shuffles made Gathers
    (:mod:`onnxprune.canonical`); the same object when there is nothing to change."""
    proto, folded = fold_constants(model.proto)
    proto, shuffles = canonical.channel_shuffles(proto)
    return model if not (folded or shuffles) else dataclasses.replace(model, proto=proto)


def fold_constants(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``proto`` with foldable nodes replaced by initializers, and the folded tensor names.

    Returns ``proto`` itself when nothing folds, and for IR version 3 models (whose initializers
    must all be graph inputs, which would make the folded values overridable inputs)."""
    if proto.ir_version < 4:
        return proto, []
    consts = _constants(proto.graph)
    candidates = _candidates(proto.graph, consts)
    if not candidates:
        return proto, []
    values = _evaluate(proto, candidates)
    folded = _accept(proto.graph, candidates, consts, values)
    if not folded:
        return proto, []
    return _rebuild(proto, folded, values), [o for n in folded for o in n.output]


# ---------------------------------------------------------------- what is constant

def _constants(graph: onnx.GraphProto) -> dict[str, tuple[int, int]]:
    """Constant tensor name -> (elements, bytes): initializers that are not graph inputs, Constant nodes."""
    inputs = {i.name for i in graph.input}
    out = {t.name: (int(np.prod(t.dims)), ir.tensor_bytes(t)) for t in graph.initializer if t.name not in inputs}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            t = ir.constant_tensor(n)
            if t is not None:
                out[n.output[0]] = (int(np.prod(t.dims)), ir.tensor_bytes(t))
    return out


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _candidates(graph: onnx.GraphProto, consts: dict[str, tuple[int, int]]) -> list[onnx.NodeProto]:
    """Nodes whose every input is a constant or another candidate's output, in graph order."""
    outputs = {o.name for o in graph.output}
    known = set(consts)
    found = []
    for n in graph.node:
        ins = [i for i in n.input if i]
        if (n.op_type in NEVER or n.domain not in ("", "ai.onnx") or _has_subgraph(n) or not ins
                or any(o in outputs for o in n.output)):
            continue
        if all(i in known for i in ins) and all(consts.get(i, (0, 0))[0] <= LIMIT for i in ins):
            found.append(n)
            known.update(o for o in n.output if o)
    return found


# ---------------------------------------------------------------- evaluation

def _evaluate(proto: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, np.ndarray]:
    """Values of the candidates' outputs: one onnxruntime run, or one per node if the batch fails."""
    try:
        return _run(proto, nodes)
    except Exception:
        pass
    values: dict[str, np.ndarray] = {}
    for n in nodes:
        try:
            values.update(_run(proto, [n], values))
        except Exception:
            continue
    return values


def _run(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], given: dict[str, np.ndarray] | None = None
         ) -> dict[str, np.ndarray]:
    given = given or {}
    made = {o for n in nodes for o in n.output}
    needed = {i for n in nodes for i in n.input if i and i not in made}
    inits = [t for t in proto.graph.initializer if t.name in needed and t.name not in given]
    inits += [numpy_helper.from_array(v, k) for k, v in given.items() if k in needed]
    const_nodes = [c for c in proto.graph.node if c.op_type == "Constant" and c.output[0] in needed]
    names = [o for n in nodes for o in n.output if o]
    graph = helper.make_graph(const_nodes + list(nodes), "fold", [], [helper.make_value_info(o, onnx.TypeProto())
                                                                       for o in names], inits)
    mini = helper.make_model(graph, opset_imports=list(proto.opset_import))
    mini.ir_version = proto.ir_version
    types = runtime.tensor_types(mini)
    for vi in mini.graph.output:
        if vi.name in types:
            vi.type.CopyFrom(types[vi.name])
    sess = runtime.session(mini, optimize=False)
    return runtime.run(sess, {}, names)


# ---------------------------------------------------------------- what to keep

def _accept(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], consts: dict[str, tuple[int, int]],
            values: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """The candidates worth folding: shape arithmetic; small results no bigger than their inputs;
    larger ones only where they replace inputs that nothing else reads (no copy)."""
    uses = ir.read_counts(graph)
    done: set[str] = set()
    folded = []
    for n in nodes:
        outs = [o for o in n.output if o]
        ins = [i for i in n.input if i]
        if not all(o in values for o in outs) or not all(i in consts or i in done for i in ins):
            continue
        size = sum(values[o].size for o in outs)
        nbytes = sum(values[o].nbytes for o in outs)
        in_bytes = sum(values[i].nbytes if i in done else consts[i][1] for i in ins)
        big = [i for i in ins if (values[i].size if i in done else consts[i][0]) > SMALL]
        alone = all(uses.get(i, 0) == 1 for i in big)
        if size > TINY and (size > LIMIT or nbytes > in_bytes or (size > SMALL and not alone)):
            continue
        folded.append(n)
        done.update(outs)
    return folded


def _rebuild(proto: onnx.ModelProto, folded: list[onnx.NodeProto], values: dict[str, np.ndarray]
             ) -> onnx.ModelProto:
    """Drop the folded nodes, add their outputs as initializers, drop constants nobody reads any more."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    gone = {id(n) for n in folded}
    keep = [n for n in proto.graph.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(keep)
    uses = ir.read_counts(g)
    g.initializer.extend(numpy_helper.from_array(values[o], o) for n in folded for o in n.output
                         if o and uses.get(o, 0))
    read = {i for n in folded for i in n.input if i}
    stale = {name for name in read if not uses.get(name, 0)}
    inputs = {i.name for i in g.input}
    kept_inits = [t for t in g.initializer if not (t.name in stale and t.name not in inputs)]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    kept_nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] in stale)]
    del g.node[:]
    g.node.extend(kept_nodes)
    return out
