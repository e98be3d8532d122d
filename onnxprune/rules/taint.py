"""Which elements of a shape-arithmetic result still hold a channel count.

``Shape(x)`` of a tensor whose channels can shrink yields a vector in which one element
is the channel count. Exporters slice and gather such vectors: ``x.view(x.size(0), -1)``
keeps only the batch element, which no pruning changes. The analysis follows the
positions of the element(s) that hold the count through each op of the table below;
when none is left, the value no longer depends on the channels. ``None`` means "every
element, as far as we can tell" (the safe answer for any op not in the table).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_graphsurgeon as gs

Positions = frozenset | None
# (node, tainted input index, its positions, value-of(tensor) -> array or None, shape-of(tensor) -> list or None)
Carrier = Callable[..., Positions]
CARRIERS: dict[str, Carrier] = {}


def carrier(*ops: str):
    def register(fn: Carrier) -> Carrier:
        for op in ops:
            CARRIERS[op] = fn
        return fn
    return register


def carry(node: gs.Node, i: int, pos: Positions, value_of, shape_of) -> Positions:
    """Positions of ``node``'s first output that hold the count, given those of input ``i``."""
    fn = CARRIERS.get(node.op)
    if fn is None or (pos is None and fn is not _count_only):
        return None
    return fn(node, i, pos, value_of, shape_of)


@carrier("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Floor", "Ceil", "Neg", "Abs", "Sqrt",
         "Reciprocal", "Not")
def _same(node, i, pos, value_of, shape_of) -> Positions:
    """Elementwise or a row-major re-view of the data input: positions stay."""
    return pos if i == 0 else None


@carrier("Shape", "Size", "ConstantOfShape")
def _count_only(node, i, pos, value_of, shape_of) -> Positions:
    """The result depends on how many elements the input has, not on their values."""
    return frozenset()


@carrier("Add", "Sub", "Mul", "Div", "Mod", "Max", "Min", "Equal", "Where", "Pow", "Less", "Greater", "And",
         "Or")
def _elementwise(node, i, pos, value_of, shape_of) -> Positions:
    """Element k of the output reads element k of every input of the same size (Where's condition
    too): positions stay unless the tainted input is broadcast over the output."""
    n_in, n_out = _size(shape_of(node.inputs[i])), _size(shape_of(node.outputs[0]))
    if n_in is None or n_in != n_out:
        return None
    return pos


@carrier("Concat")
def _concat(node, i, pos, value_of, shape_of) -> Positions:
    """Along axis 0 the flat positions of each input are offset by the sizes before it."""
    rank = len(shape_of(node.outputs[0]) or [])
    if int(node.attrs.get("axis", 0)) % max(rank, 1) != 0:
        return None
    sizes = [_size(shape_of(t)) for t in node.inputs[:i]]
    if any(s is None for s in sizes):
        return None
    offset = sum(sizes)
    return frozenset(p + offset for p in pos)


def _picked(node, n: int, value_of) -> np.ndarray | None:
    """Source element of each output element of a 1-D Slice or Gather (None when not static)."""
    if node.op == "Gather":
        ind = value_of(node.inputs[1]) if len(node.inputs) > 1 else None
        return None if ind is None else np.ravel(ind).astype(np.int64) % n
    if "starts" in node.attrs:                       # Slice-1: bounds as attributes
        starts, ends = node.attrs["starts"], node.attrs["ends"]
        steps = [1]
    else:
        args = [value_of(t) if k < len(node.inputs) and t.name else None
                for k, t in enumerate(node.inputs[1:5], start=1)]
        starts, ends = args[0], args[1]
        steps = args[3] if len(args) > 3 and args[3] is not None else [1]
        if starts is None or ends is None or (len(args) > 2 and args[2] is not None
                                               and [int(a) for a in np.ravel(args[2])] not in ([0], [-1])):
            return None
    if len(np.ravel(starts)) != 1:
        return None
    return np.arange(n)[slice(int(np.ravel(starts)[0]), int(np.ravel(ends)[0]), int(np.ravel(steps)[0]))]


@carrier("Slice", "Gather")
def _select(node, i, pos, value_of, shape_of) -> Positions:
    if i != 0 or int(node.attrs.get("axis", 0)) not in (0, -1):
        return None
    shape = shape_of(node.inputs[0])
    picked = None if shape is None or len(shape) != 1 else _picked(node, shape[0], value_of)
    if picked is None:
        return None
    return frozenset(k for k, p in enumerate(picked.tolist()) if p in pos)


def _size(shape) -> int | None:
    return None if shape is None else int(np.prod(shape))


def static_or_const(analysis):
    """``value_of`` for :func:`carry`: a constant's values or a static observed value."""
    def value_of(t: gs.Tensor):
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        return analysis.static_value(t.name)
    return value_of
