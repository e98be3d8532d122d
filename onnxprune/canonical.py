"""Canonical forms before the analysis: a channel shuffle becomes a ``Gather`` of channels.

ShuffleNet-style blocks shuffle channels with ``Reshape [N, C, ...] -> [N, g, C/g, ...]``,
``Transpose`` swapping the two split axes, and ``Reshape`` back to ``[N, C, ...]``. Kept in
that form, pruning must keep the ``g`` slices the same size and aligned, which couples
channel ``j`` of every slice into one channel id (and chains whole stages into one group).
The three nodes compute a fixed permutation of axis 1, so :func:`channel_shuffles`
replaces them by one ``Gather(x, perm, axis=1)``: the same values, and any subset of
channels can then go (the Gather rule slices ``perm``).

A pattern is replaced only when shapes prove it (from shape inference, or observed in
onnxruntime runs, two with symbolic input dimensions at different sizes): the input's channel count and
every non-batch dimension are known, the first Reshape splits exactly axis 1 into
``g x C/g``, the Transpose swaps exactly those two axes, the second Reshape restores the
input's shape, and the intermediate tensors have no other reader.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ir, runtime
from .data import random_feed


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """Gather indices equal to the Reshape-Transpose-Reshape shuffle of ``channels`` in ``groups``."""
    o = np.arange(channels)
    return ((o % groups) * (channels // groups) + o // groups).astype(np.int64)


def channel_shuffles(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``proto`` with proven channel shuffles replaced by Gathers, and how many (``proto`` itself if none)."""
    candidates = _candidates(proto.graph)
    if not candidates:
        return proto, 0
    shapes = ir.infer_shapes(proto)
    _observe(proto, shapes, [n.input[0] for n, _, _ in candidates] + [n.output[0] for n, _, _ in candidates]
             + [n.output[0] for _, _, n in candidates])
    proven = [(r1, t, r2, g) for r1, t, r2 in candidates if (g := _groups(shapes, r1, r2)) is not None]
    if not proven:
        return proto, 0
    return _rebuild(proto, proven, shapes), len(proven)


def _observe(proto: onnx.ModelProto, shapes: dict[str, list], names: list[str]) -> None:
    """Fill in shapes inference left open by onnxruntime runs. With every input dimension fixed one
    run tells the only shape a tensor can have; with symbolic ones (a dynamic batch) the model runs
    with them at 1 and at 2, and a dimension that differs between the runs stays unknown (None)."""
    missing = sorted({n for n in names if shapes.get(n) is None or None in shapes[n]})
    inputs = {vi.name: ir.input_dims(vi) for vi in ir.graph_inputs(proto)}
    if not missing:
        return
    runs = []
    for size in (1, 2):
        concrete = {k: [d if isinstance(d, int) and d > 0 else size for d in dims] for k, dims in inputs.items()}
        try:
            fixed = ir.with_input_shapes(proto, concrete)
            sess = runtime.session(runtime.with_outputs(fixed, missing), optimize=False)
            runs.append(runtime.run(sess, random_feed(fixed, concrete), missing))
        except Exception:   # a model onnxruntime cannot run here keeps its shuffles as they are
            return
        if all(isinstance(d, int) and d > 0 for dims in inputs.values() for d in dims):
            break
    for n in missing:
        dims = [list(r[n].shape) for r in runs]
        if all(len(d) == len(dims[0]) for d in dims):
            shapes[n] = [a if all(d[k] == a for d in dims) else None for k, a in enumerate(dims[0])]


def _candidates(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """Reshape -> Transpose (swapping axes 1 and 2 only) -> Reshape chains with private intermediates."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = ir.read_counts(graph)
    consumer: dict[str, onnx.NodeProto] = {}
    for n in graph.node:
        for i in n.input:
            consumer.setdefault(i, n)
    out = []
    for t in graph.node:
        if t.op_type != "Transpose" or not t.input:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if perm is None or len(perm) < 4 or perm[:3] != [0, 2, 1] or perm[3:] != list(range(3, len(perm))):
            continue
        r1, r2 = producer.get(t.input[0]), consumer.get(t.output[0])
        if r1 is None or r2 is None or r1.op_type != "Reshape" or r2.op_type != "Reshape":
            continue
        if readers.get(r1.output[0]) != 1 or readers.get(t.output[0]) != 1:
            continue
        out.append((r1, t, r2))
    return out


def _groups(shapes: dict[str, list], r1: onnx.NodeProto, r2: onnx.NodeProto) -> int | None:
    """The shuffle's group count if shapes prove the chain is a channel permutation, else None."""
    x, mid, y = shapes.get(r1.input[0]), shapes.get(r1.output[0]), shapes.get(r2.output[0])
    if x is None or mid is None or y is None or len(x) < 3 or len(mid) != len(x) + 1 or len(y) != len(x):
        return None
    c, g, per = x[1], mid[1], mid[2]
    if not all(isinstance(d, int) and d > 0 for d in (c, g, per)) or g * per != c or g == 1:
        return None
    rest = x[2:]
    if not all(isinstance(d, int) and d > 0 for d in rest) or mid[3:] != rest or y[1:] != x[1:]:
        return None
    if not (x[0] == mid[0] == y[0] or (x[0] is None and mid[0] is None and y[0] is None)):
        return None
    return g


def _rebuild(proto: onnx.ModelProto, proven: list, shapes: dict[str, list]) -> onnx.ModelProto:
    """A copy of ``proto`` where every proven chain is one Gather writing the chain's output."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    gone, new_at, targets = set(), {}, set()
    taken = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    for r1, t, r2, groups in proven:
        name = ir.fresh_name(f"{r2.name or r2.output[0]}/shuffle_as_gather", taken)
        perm = ir.fresh_name(f"{name}/perm", taken)
        g.initializer.append(numpy_helper.from_array(shuffle_permutation(shapes[r1.input[0]][1], groups), perm))
        gone.update((id(r1), id(t)))
        new_at[id(r2)] = helper.make_node("Gather", [r1.input[0], perm], [r2.output[0]], name=name, axis=1)
        targets.update(n.input[1] for n in (r1, r2) if len(n.input) > 1)
    nodes = [new_at.get(id(n), n) for n in proto.graph.node if id(n) not in gone]
    del g.node[:]
    g.node.extend(nodes)
    _drop_dead(g, targets)
    return out


def _drop_dead(g: onnx.GraphProto, names: set[str]) -> None:
    """Remove what computed the replaced Reshapes' targets (``names``) once nothing reads it any more:
    their producers, transitively, and initializers that are not graph inputs. Nothing else is touched."""
    producer = {o: n for n in g.node for o in n.output}
    inputs = {i.name for i in g.input}
    uses = ir.read_counts(g)
    dead, dead_inits, todo = set(), set(), list(names)
    while todo:
        name = todo.pop()
        if uses.get(name):
            continue
        node = producer.get(name)
        if node is None:
            if name not in inputs:
                dead_inits.add(name)
            continue
        if id(node) in dead or any(uses.get(o) for o in node.output if o) or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            continue
        dead.add(id(node))
        for i in node.input:
            if i:
                uses[i] -= 1
                todo.append(i)
    nodes = [n for n in g.node if id(n) not in dead]
    inits = [t for t in g.initializer if t.name not in dead_inits]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    g.initializer.extend(inits)
