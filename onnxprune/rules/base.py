"""What an op rule sees and may do while channel indices flow through the graph.

Every tensor has at most one *labelled* axis: the axis pruning can shrink.
Its label is an int array with one channel id per position; id 0 marks
positions that are not prunable channels at all (graph inputs, barriers'
outputs) and is never merged with anything. Rules read their inputs' labels, set their outputs'
labels, couple ids (``union``), freeze ids (``fix``), and declare which
constant tensors get sliced (``member``) and which attributes or shape
constants must follow (``fixup``). Everything else about the graph is the
driver's business (``analysis.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

FIXED = 0


@dataclass
class Label:
    axis: int
    ids: np.ndarray  # int64, one channel id per position of ``axis``


class UnionFind:
    def __init__(self):
        self.parent = np.zeros(1, dtype=np.int64)  # id 0 = FIXED
        self.block = np.zeros(1, dtype=np.int64)   # which allocation (layer output) an id came from
        self._blocks = 1

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n, dtype=np.int64)])
        self.block = np.concatenate([self.block, np.full(n, self._blocks, dtype=np.int64)])
        self._blocks += 1
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, i: int) -> int:
        p = self.parent
        root = i
        while p[root] != root:
            root = p[root]
        while p[i] != root:
            p[i], i = root, p[i]
        return int(root)

    def find_all(self, ids: np.ndarray) -> np.ndarray:
        # vectorised path halving until stable
        p = self.parent
        r = p[ids]
        while True:
            nxt = p[r]
            if np.array_equal(nxt, r):
                return r
            r = nxt

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra


Fixup = Callable[["RewriteView"], None]


class RewriteView:
    """What a fixup may ask at rewrite time (implemented in rewrite.py)."""

    def kept(self, tensor: str) -> np.ndarray:  # kept positions of the labelled axis of an original tensor
        raise NotImplementedError

    def new_size(self, tensor: str) -> int:
        raise NotImplementedError

    def set_attr(self, node: gs.Node, name: str, value) -> None:
        raise NotImplementedError

    def set_const(self, node: gs.Node, input_index: int, value: np.ndarray) -> None:
        raise NotImplementedError

    def take(self, node: gs.Node, input_index: int, axis: int, positions: np.ndarray) -> None:
        """Input ``input_index`` is read at ``positions`` of ``axis`` only (a Gather before the node)."""
        raise NotImplementedError

    def set_elements(self, node: gs.Node, input_index: int, value: np.ndarray, mask: np.ndarray) -> None:
        """Input ``input_index`` takes ``value`` where ``mask`` is set and keeps its run-time value
        elsewhere (a later call wins where masks overlap)."""
        raise NotImplementedError


class Unsupported(Exception):
    """Raised by a rule for a case it cannot prove; the driver turns it into a barrier."""


class NodeCtx:
    """A rule's window on one node. Created by the driver for each node in topological order."""

    def __init__(self, analysis, node: gs.Node):
        self._a = analysis
        self.node = node
        self.op = node.op
        self.attrs = node.attrs
        self.name = node.name
        self.opset = analysis.opset

    def analysis_option(self, name: str, default=None):
        return getattr(self._a.options, name, default)

    # ------------------------------------------------------------ reading
    @property
    def inputs(self) -> list[gs.Tensor]:
        return self.node.inputs

    @property
    def outputs(self) -> list[gs.Tensor]:
        return self.node.outputs

    def present(self, i: int) -> bool:
        return i < len(self.node.inputs) and self.node.inputs[i].name != ""

    def shape(self, t: gs.Tensor | int) -> list[int]:
        t = self._t(t)
        return self._a.shape_of(t)

    def rank(self, t: gs.Tensor | int) -> int:
        return len(self.shape(t))

    def const(self, t: gs.Tensor | int) -> np.ndarray | None:
        """Value of a constant input, or of a tensor whose value the analysis run observed (shape inputs)."""
        t = self._t(t)
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return None

    def static(self, t: gs.Tensor | int) -> np.ndarray | None:
        """A constant's value, or the value of a small computed tensor (shape arithmetic) that the
        analysis observed to be the same whatever the symbolic input dimensions. The rewrite
        replaces such a tensor by a constant wherever a fixup sets it."""
        t = self._t(t)
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return self._a.static_value(t.name)

    def elements(self, t: gs.Tensor | int) -> tuple[np.ndarray, np.ndarray] | None:
        """(value, mask of elements read at run time) of a constant or of a small computed tensor
        (shape arithmetic) the analysis observed; elements outside the mask do not change with the
        symbolic input dimensions. None when the value is unknown."""
        t = self._t(t)
        if isinstance(t, gs.Constant):
            v = np.asarray(t.values)
            return v, np.zeros(v.shape, dtype=bool)
        return self._a.elements(t.name)

    @property
    def varies_note(self) -> str:
        """How an element read at run time (see :meth:`elements`) is described in a reason."""
        return self._a.vary_note

    def is_const(self, t: gs.Tensor | int) -> bool:
        return isinstance(self._t(t), gs.Constant)

    def axes_arg(self, what: str = "axes") -> list[int] | None:
        """The ``axes`` attribute, or input 1 where newer opsets moved it (None when absent)."""
        axes = self.attr("axes")
        if axes is None and self.present(1):
            v = self.static(1)
            if v is None:
                raise Unsupported(f"{what} computed at run time")
            axes = v.tolist()
        return None if axes is None else [int(a) for a in axes]

    def label(self, t: gs.Tensor | int) -> Label | None:
        return self._a.labels.get(self._t(t).name)

    def ids_on(self, t: gs.Tensor | int, axis: int) -> np.ndarray:
        """Ids along ``axis`` of ``t``: its label if that axis is labelled, else all FIXED.

        An unlabelled KV-cache graph input gets ids of its own on ``axis`` (see
        ``analysis._Driver.boundary_ids``): coupling it then frees or freezes it with its heads."""
        t = self._t(t)
        lab = self._a.labels.get(t.name)
        if lab is not None and lab.axis == axis:
            return lab.ids
        if lab is None:
            ids = self._a.boundary_ids(t, axis, self.node)
            if ids is not None:
                return ids
        return np.zeros(self.shape(t)[axis], dtype=np.int64)

    def attr(self, name: str, default=None):
        return self.node.attrs.get(name, default)

    def _t(self, t) -> gs.Tensor:
        return self.node.inputs[t] if isinstance(t, int) else t

    # ------------------------------------------------------------ writing
    def set(self, out: gs.Tensor | int, axis: int, ids: np.ndarray) -> None:
        t = self.node.outputs[out] if isinstance(out, int) else out
        self._a.set_label(t, axis, np.asarray(ids, dtype=np.int64), self.node)

    def new_ids(self, n: int) -> np.ndarray:
        return self._a.uf.new(n)

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            raise Unsupported(f"cannot align channel positions ({a.shape} vs {b.shape})")
        fixed = (a == FIXED) | (b == FIXED)
        if fixed.any() and not ((a == FIXED) & (b == FIXED)).all():
            self.fix(np.concatenate([a[fixed], b[fixed]]),
                     "coupled position by position with channels that cannot be pruned")
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y and x != FIXED and y != FIXED:
                self._a.uf.union(x, y)

    def union_within(self, ids: np.ndarray) -> int:
        """Couple all ``ids`` into one channel; returns the representative."""
        ids = np.asarray(ids).ravel()
        live = ids[ids != FIXED]
        if len(live) < len(ids):
            self.fix(live, "coupled with channels that cannot be pruned")
            return FIXED
        first = int(ids[0])
        for x in ids[1:].tolist():
            self._a.uf.union(first, x)
        return first

    def fix(self, ids: np.ndarray, reason: str) -> None:
        self._a.fix(np.asarray(ids), f"{self.op} '{self.name}': {reason}")

    def fix_input(self, t: gs.Tensor | int, reason: str) -> None:
        lab = self.label(t)
        if lab is not None:
            self.fix(lab.ids, reason)

    def member(self, t: gs.Tensor | int, axis: int, ids: np.ndarray, kind: str) -> None:
        """Declare that ``axis`` of input ``t`` (a constant this node uses) follows ``ids``."""
        idx = t if isinstance(t, int) else self.node.inputs.index(t)
        tensor = self.node.inputs[idx]
        if not isinstance(tensor, gs.Constant):
            raise Unsupported(f"input {idx} ('{tensor.name}') is not a constant")
        self._a.add_member(tensor.name, axis, np.asarray(ids, dtype=np.int64), kind, self.node, idx)

    def take_kept(self, i: int, axis: int, out: int = 0) -> None:
        """Input ``i``, a run-time tensor without channels whose ``axis`` lines up position by position
        with output ``out``'s channel axis, is read only at the positions the output keeps."""
        out_name, node = self.outputs[out].name, self.node

        def fix(view):
            view.take(node, i, axis, view.kept(out_name))
        self.fixup(fix)

    def note_structure(self, ids: np.ndarray, role: str) -> None:
        """Say what these channels are (``head``, ``head_dim``), for the report."""
        self._a.structure_notes.append((np.asarray(ids, dtype=np.int64), role))

    def read_channel_count(self, ids: np.ndarray, out: int = 0, position: int | None = None) -> None:
        """Output ``out`` holds these channels' count (Shape, Size): at element ``position``, or
        anywhere (None)."""
        self._a.read_channel_count(self.node.outputs[out], ids, f"{self.op} '{self.name}'", position)

    def fixup(self, fn: Fixup) -> None:
        self._a.fixups.append((self.node, fn))

    def unless_over_channels(self, axes, reason: str, outputs=(0,)) -> None:
        """Freeze the channels if the op works across them (``axes`` holds the channel axis), else pass them."""
        lab = self.label(0)
        if lab is None:
            return
        if lab.axis in axes:
            self.fix(lab.ids, reason)
            return
        for out in outputs:
            self.passthrough(0, out)

    def passthrough(self, src: int = 0, out: int = 0) -> None:
        """Output ``out`` carries the labels of input ``src`` unchanged (same rank, same axis)."""
        lab = self.label(src)
        if lab is not None:
            self.set(out, lab.axis, lab.ids)
