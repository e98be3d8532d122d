"""Apply a plan: slice constants, run the rules' fixups, re-export and check the model.

The removed channels of every group become removed positions of every member
tensor. Constants are sliced per use: a constant shared by several nodes that
need different slices (or none) gets one copy per distinct slice, so tied or
deduplicated initializers are never corrupted for their other users.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir
from .groups import ACTIVATION, Analysis
from .rules.base import RewriteView

LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class RewriteResult:
    proto: onnx.ModelProto
    removed_positions: dict[str, tuple[int, np.ndarray]]   # original activation tensor -> (axis, removed)
    kept_inputs: dict[str, np.ndarray] = field(default_factory=dict)   # layer node -> kept input channels
    kept_outputs: dict[str, np.ndarray] = field(default_factory=dict)  # layer node -> kept output channels
    groups: list[dict] = field(default_factory=list)                   # the report's per-group removals
    input_shapes: dict[str, list[int]] = field(default_factory=dict)   # the pruned model's (analysis) input shapes


def removal_maps(analysis: Analysis, plan: dict[int, np.ndarray]):
    """Removed positions per activation tensor and per constant use (node, input index) -> {axis: positions}."""
    acts: dict[str, tuple[int, set]] = {}
    uses: dict[tuple[str, int], dict[int, set]] = {}
    report = []
    for g in analysis.groups:
        removed = np.asarray(plan.get(g.id, []), dtype=np.int64)
        if len(removed) == 0:
            continue
        tensors = {}
        for m in g.members:
            pos = m.positions(removed)
            if len(pos) == 0:
                continue
            if m.kind == ACTIVATION:
                acts.setdefault(m.tensor, (m.axis, set()))[1].update(pos.tolist())
            else:
                uses.setdefault((m.node, m.input_index), {}).setdefault(m.axis, set()).update(pos.tolist())
            tensors.setdefault((m.tensor, m.axis), set()).update(pos.tolist())
        report.append({"group": g.id, "label": g.label, "structure": g.structure, "size": g.size,
                       "removed_channels": removed.tolist(),
                       "tensors": [{"tensor": t, "axis": a, "removed": sorted(p)} for (t, a), p in tensors.items()]})
    return acts, uses, report


class _View(RewriteView):
    """Fixups name nodes of the analysis graph; edits land on the same-named nodes of the rewrite graph."""

    def __init__(self, graph: gs.Graph, nodes: dict[str, gs.Node], analysis: Analysis, acts: dict):
        self.graph, self.nodes, self.acts = graph, nodes, acts
        self.shapes, self.labels = analysis.shapes, analysis.channel_axes
        self._n = 0
        self._set: dict[tuple[str, int], tuple[gs.Tensor, np.ndarray, np.ndarray]] = {}  # run-time inputs

    def kept(self, tensor: str) -> np.ndarray:
        """Kept positions of the channel axis of an original tensor (all of them if it lost none)."""
        axis = self.labels[tensor].axis
        return _kept(self.shapes[tensor][axis], self.acts.get(tensor, (axis, set()))[1])

    def new_size(self, tensor: str) -> int:
        return len(self.kept(tensor))

    def set_attr(self, node: gs.Node, name: str, value) -> None:
        node = self.nodes[node.name]
        if value is None:
            node.attrs.pop(name, None)
        else:
            node.attrs[name] = value

    def set_const(self, node: gs.Node, input_index: int, value: np.ndarray) -> None:
        node = self.nodes[node.name]
        while len(node.inputs) <= input_index:
            node.inputs.append(gs.Variable.empty())
        old = node.inputs[input_index]
        if isinstance(old, gs.Constant) and np.array_equal(np.asarray(old.values), value):
            return
        shared = isinstance(old, gs.Constant) and len(old.outputs) > 1
        if isinstance(old, gs.Constant) and not shared:
            old.values = np.asarray(value)
            return
        node.inputs[input_index] = gs.Constant(self.unique(f"{old.name or node.name}_pruned"), np.asarray(value))

    def take(self, node: gs.Node, input_index: int, axis: int, positions: np.ndarray) -> None:
        node = self.nodes[node.name]
        src = node.inputs[input_index]
        n = self.shapes[src.name][axis] if src.name in self.shapes else None
        if n is not None and len(positions) == n:
            return
        out = gs.Variable(self.unique(f"{src.name}_kept"), dtype=src.dtype)
        self.graph.nodes.append(gs.Node("Gather", name=self.unique(f"{node.name}_take{input_index}"), attrs={"axis": axis},
                                        inputs=[src, gs.Constant(self.unique(f"{out.name}_index"),
                                                                 np.asarray(positions, dtype=np.int64))],
                                        outputs=[out]))
        node.inputs[input_index] = out

    def set_elements(self, node: gs.Node, input_index: int, value: np.ndarray, mask: np.ndarray) -> None:
        """Some elements of an input become constants: the whole input if it is a constant or every
        element is set, else ``Where(mask, value, run-time input)`` (one per node input, so a shape
        value shared by several nodes is only changed where each of them needs it)."""
        node = self.nodes[node.name]
        key = (node.name, input_index)
        value, mask = np.asarray(value), np.asarray(mask, dtype=bool)
        base = node.inputs[input_index]
        if key in self._set:
            base, v0, m0 = self._set[key]
            value, mask = np.where(mask, value, v0).astype(v0.dtype), mask | m0
        if isinstance(base, gs.Constant):
            current = np.asarray(base.values)
            self.set_const(node, input_index, np.where(mask, value, current).astype(current.dtype))
            return
        if mask.all():
            self.set_const(node, input_index, value)
            self._set.pop(key, None)
            return
        out = gs.Variable(self.unique(f"{base.name}_set"), dtype=value.dtype, shape=list(value.shape))
        where = gs.Node("Where", name=self.unique(f"{node.name}_set{input_index}"),
                        inputs=[gs.Constant(self.unique(f"{out.name}_mask"), mask),
                                gs.Constant(self.unique(f"{out.name}_value"), value), base], outputs=[out])
        self.graph.nodes.append(where)
        node.inputs[input_index] = out
        self._set[key] = (base, value, mask)

    def unique(self, base: str) -> str:
        names = self.graph.tensors()
        name = base
        while name in names:
            self._n += 1
            name = f"{base}_{self._n}"
        return name


def _kept(n: int, removed) -> np.ndarray:
    """The positions of ``range(n)`` not in ``removed``, ascending."""
    keep = np.ones(n, dtype=bool)
    keep[np.fromiter(removed, dtype=np.int64, count=len(removed))] = False
    return np.flatnonzero(keep)


def _slice(values: np.ndarray, spec: dict[int, set]) -> np.ndarray:
    """``values`` without the removed positions of each axis."""
    for axis, removed in sorted(spec.items()):
        values = np.take(values, _kept(values.shape[axis], removed), axis=axis)
    return values


def _values(const: gs.Constant) -> np.ndarray:
    """A constant's values, read without graphsurgeon's extra copy (read-only: they are only sliced)."""
    lazy = const._values
    return ir.tensor_to_array(lazy.tensor) if type(lazy) is gs.ir.tensor.LazyValues else np.asarray(const.values)


def apply(analysis: Analysis, plan: dict[int, np.ndarray], original: ir.Model | onnx.ModelProto) -> RewriteResult:
    """The pruned model for ``plan`` (group id -> removed channel indices)."""
    template = original.proto if isinstance(original, ir.Model) else original
    acts, uses, report = removal_maps(analysis, plan)
    graph = ir.to_graph(template)
    nodes = {n.name: n for n in graph.nodes}
    view = _View(graph, nodes, analysis, acts)

    # constants, per use; a shared constant is copied where its users disagree
    by_tensor: dict[str, list[tuple[gs.Node, int, dict]]] = {}
    for (node_name, idx), spec in uses.items():
        node = nodes[node_name]
        by_tensor.setdefault(node.inputs[idx].name, []).append((node, idx, spec))
    for tname, wanted in by_tensor.items():
        const = wanted[0][0].inputs[wanted[0][1]]
        specs = {_key(spec) for _, _, spec in wanted}
        n_uses = sum(1 for c in const.outputs for t in c.inputs if t is const)
        if len(specs) == 1 and n_uses == len(wanted) and not _is_graph_output(graph, const):
            const.values = _slice(_values(const), wanted[0][2])
            continue
        copies: dict[tuple, gs.Constant] = {}
        for node, idx, spec in wanted:
            k = _key(spec)
            if k not in copies:
                copies[k] = gs.Constant(view.unique(f"{tname}_pruned"), _slice(_values(const), spec))
            node.inputs[idx] = copies[k]

    for _, fn in analysis.fixups:
        fn(view)
    input_shapes = _boundary_shapes(graph, analysis, view, acts)

    proto = ir.from_graph(graph, template)
    result = RewriteResult(proto=proto, removed_positions={k: (a, np.array(sorted(p))) for k, (a, p) in acts.items()},
                           groups=report, input_shapes=input_shapes)
    for n in graph.nodes:
        if n.op in LAYER_OPS:
            data_in = 1 if (n.op == "MatMul" and isinstance(n.inputs[0], gs.Constant)) else 0
            src = n.inputs[data_in].name
            if src in acts:
                result.kept_inputs[n.name] = view.kept(src)
            if n.outputs and n.outputs[0].name in acts:
                result.kept_outputs[n.name] = view.kept(n.outputs[0].name)
    return result


def _boundary_shapes(graph: gs.Graph, analysis: Analysis, view: _View, acts: dict) -> dict[str, list[int]]:
    """Graph inputs and outputs that lost positions (KV caches, with ``kv_cache``) declare their new
    size; returns the analysis input shapes of the pruned model."""
    shapes = {k: list(v) for k, v in analysis.input_shapes.items()}
    for t in [*graph.inputs, *graph.outputs]:
        if t.name not in acts or isinstance(t, gs.Constant):
            continue
        axis, n = acts[t.name][0], view.new_size(t.name)
        if t.shape is not None and axis < len(t.shape):
            dims = list(t.shape)
            dims[axis] = n
            t.shape = dims
        if t.name in shapes:
            shapes[t.name][axis] = n
    return shapes


def _key(spec: dict[int, set]) -> tuple:
    return tuple(sorted((a, tuple(sorted(p))) for a, p in spec.items()))


def _is_graph_output(graph: gs.Graph, t: gs.Tensor) -> bool:
    return any(o is t for o in graph.outputs)
