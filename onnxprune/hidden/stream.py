"""The residual stream of a pre-norm transformer: what writes into it and what reads it.

The stream is the set of tensors joined by residual ``Add`` nodes whose sums are read only by
normalisations (:mod:`.norms`) and by further residual ``Add`` nodes. Every value added into it
comes from a **writer**, whose last-axis values are rotated by ``Q``:

    MatMul(a, W)  W [k, d]        (attention output projection, FFN down projection)
    Gemm(a, W)    W [k, d] or [d, k] with transB, and its bias C
    Gather(E, ids, axis=0)        (token and position embeddings)
    Add(t, c)     a constant broadcast over the last axis (a bias, position embeddings)

A norm's output is read by **readers**, linear layers on the last axis (q/k/v, FFN up and gate, LM
head or classifier), whose weights absorb the norm's scale and bias and the rotation ``Q^T``:
``MatMul(y, W)`` (W [d, k], or ``Transpose(E)`` of a constant: a tied LM head) and ``Gemm(y, W)``.
In a post-norm block (BERT) the norm's output is itself the stream: the residual ``Add`` reading it
gets it back in the rotated basis through a ``d' x d'`` MatMul (a :class:`Use` of kind "stream"); any
other reader (a graph output, a pooler's Gather) gets it in the original basis ("full"). Anything
else that reads the stream itself (a graph output, a Shape of its last axis, a MatMul on a residual
sum without a norm) is a reason, and the model keeps its width.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import ir
from .norms import Norm, constants, find_norms


@dataclass
class Writer:
    node: str
    op: str
    tensor: str          # the constant whose last (or, ``rows``, first) axis is the stream
    rows: bool = False   # Gemm with transB: the stream is axis 0 of the weight
    target: str = ""     # the stream tensor it writes (its segment's basis rotates it)


@dataclass
class Reader:
    norm: int            # index into Stream.norms
    node: str            # MatMul or Gemm
    tensor: str          # the weight constant (for a tied head: the embedding table)
    rows: bool = False   # the weight is [k, d] (Gemm transB, or MatMul of Transpose(E))
    via: str = ""        # the Transpose node between the weight and the MatMul
    copy: str = ""       # the weight the node reads, when ``tensor`` is an embedding table it equals (transposed)


@dataclass
class Use:
    """A node reading a norm's output that is not a linear layer: a residual ``Add`` of a post-norm block
    (``kind`` "stream": it gets the output in the rotated basis) or anything else ("full": it gets the
    output in the original basis, rebuilt by one ``d' x d`` MatMul)."""

    norm: int
    node: str
    kind: str


@dataclass
class Stream:
    width: int
    norms: list[Norm]
    tensors: list[str]
    writers: list[Writer]
    readers: list[Reader]
    tied: list[str] = field(default_factory=list)     # constants that are both writer and reader
    uses: list["Use"] = field(default_factory=list)    # other readers of norm outputs
    outputs: list[int] = field(default_factory=list)  # norms whose output is a graph output
    segment: dict[str, int] = field(default_factory=dict)   # stream tensor -> its segment

    @property
    def segments(self) -> int:
        """Parts of the stream that post-norm blocks separate (1 for a pre-norm model): each may have its
        own basis, since a post-norm block's output reaches the next part through a matrix anyway."""
        return max(self.segment.values(), default=0) + 1

    def norm_segments(self, i: int) -> tuple[int, int | None]:
        """(segment of norm ``i``'s input, segment its output is added into, or None)."""
        n = self.norms[i]
        return self.segment[n.x], self.segment.get(n.y)

    @property
    def kind(self) -> str:
        """``layer`` when any norm centres (then the rotation keeps out the all-ones direction)."""
        return "layer" if any(n.kind == "layer" for n in self.norms) else "rms"


@dataclass
class NoStream:
    reason: str

    def __bool__(self) -> bool:
        return False


def find_stream(proto: onnx.ModelProto) -> Stream | NoStream:
    """The residual stream of ``proto``, or why it has none that can be rotated."""
    g = proto.graph
    shapes = {k: v for k, (v, _) in ir.infer(proto).items()}
    norms = find_norms(proto, shapes)
    if not norms:
        return NoStream("no LayerNorm or RMSNorm over the last axis")
    width = Counter(n.width for n in norms).most_common(1)[0][0]
    norms = [n for n in norms if n.width == width]
    consts = constants(g)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    by_root = {n.x: i for i, n in enumerate(norms)}
    by_out = {n.y: i for i, n in enumerate(norms)}
    norm_nodes = {name for n in norms for name in n.nodes}

    stream, writers, todo = [], [], [n.x for n in norms]
    seen: set[str] = set()
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        while parent.setdefault(t, t) != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    def writer_const(node, name) -> str | None:
        t = consts[name]
        dims = list(t.dims)
        if t.data_type != onnx.TensorProto.FLOAT or not dims or dims[-1] not in (1, width):
            return f"'{node.name}' adds constant '{name}' of shape {dims} to the stream"
        writers.append(Writer(node.name, "Add", name, target=node.output[0]))
        return None

    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        stream.append(t)
        shape = shapes.get(t)
        if not shape or shape[-1] != width:
            return NoStream(f"stream tensor '{t}' has shape {shape}, not [..., {width}]")
        if t in by_out:   # a post-norm block: the norm's output is the stream (its uses are checked below)
            todo.append(norms[by_out[t]].x)
            for c in consumers.get(t, []):
                if c.op_type == "Add":
                    todo.append(c.output[0])
                    union(t, c.output[0])
            continue
        if t in outputs:
            return NoStream(f"the stream tensor '{t}' is a graph output")
        p = producer.get(t)
        if p is None:
            return NoStream(f"the stream starts at graph input '{t}'")
        if p.op_type == "Add":
            for i in p.input:
                if i in consts:
                    if (why := writer_const(p, i)) is not None:
                        return NoStream(why)
                else:
                    todo.append(i)
                    union(t, i)
        elif p.op_type == "MatMul" and p.input[1] in consts and len(consts[p.input[1]].dims) == 2:
            writers.append(Writer(p.name, p.op_type, p.input[1], target=t))
        elif p.op_type == "Gemm" and p.input[1] in consts and attr(p, "transA", 0) == 0:
            writers.append(Writer(p.name, p.op_type, p.input[1], rows=bool(attr(p, "transB", 0)), target=t))
            if len(p.input) > 2 and p.input[2]:
                if p.input[2] not in consts or (why := writer_const(p, p.input[2])) is not None:
                    return NoStream(f"'{p.name}' has a bias that is not a constant over the stream")
        elif p.op_type == "Gather" and p.input[0] in consts and attr(p, "axis", 0) == 0 \
                and len(consts[p.input[0]].dims) == 2:
            writers.append(Writer(p.name, p.op_type, p.input[0], target=t))
        else:
            return NoStream(f"'{p.name}' ({p.op_type}) writes the stream tensor '{t}' and is not a linear layer, "
                            "an embedding or a residual Add")
        for c in consumers.get(t, []):
            if c.name in norm_nodes and t in by_root:
                continue
            if c.op_type == "Shape" and _shape_ok(c, consumers, consts, len(shape)):
                continue
            if c.op_type == "Add":  # a residual Add or a writer's bias: its output is in the stream too
                todo.extend(i for i in list(c.input) + list(c.output) if i not in seen and i not in consts)
                union(t, c.output[0])
                continue
            return NoStream(f"'{c.name}' ({c.op_type}) reads the stream tensor '{t}' directly (only norms and "
                            "residual Adds may)")
    if not any(w.op == "Gather" for w in writers):
        return NoStream("no embedding writes the stream")
    norms = [n for n in norms if n.x in seen]
    readers, uses, outs = [], [], []
    for i, n in enumerate(norms):
        for c in consumers.get(n.y, []):
            if c.op_type == "Shape" and _shape_ok(c, consumers, consts, len(shapes.get(n.y) or [])):
                continue
            r = _reader(c, i, consts, producer, consumers)
            if r is not None:
                readers.append(r)
            elif c.op_type == "Add" and c.output[0] in seen:
                uses.append(Use(i, c.name, "stream"))
            else:
                uses.append(Use(i, c.name, "full"))
        if n.y in outputs:
            outs.append(i)
    written = {w.tensor for w in writers}
    _tie_copies(readers, writers, consts)
    tied = sorted({r.tensor for r in readers if r.tensor in written})
    roots = list(dict.fromkeys(find(t) for t in stream))
    segment = {t: roots.index(find(t)) for t in stream}
    return Stream(width, norms, stream, writers, readers, tied, uses, outs, segment)


def _reader(c, norm, consts, producer, consumers) -> Reader | None:
    if c.op_type == "MatMul" and c.input[1] in consts and len(consts[c.input[1]].dims) == 2 and c.input[0] != c.input[1]:
        return Reader(norm, c.name, c.input[1])
    if c.op_type == "MatMul":
        t = producer.get(c.input[1])
        if t is not None and t.op_type == "Transpose" and t.input[0] in consts and \
                list(attr(t, "perm", [1, 0])) == [1, 0] and len(consts[t.input[0]].dims) == 2:
            return Reader(norm, c.name, t.input[0], rows=True, via=t.name)
    if c.op_type == "Gemm" and c.input[1] in consts and attr(c, "transA", 0) == 0 and \
            abs(attr(c, "alpha", 1.0) - 1.0) < 1e-12:
        return Reader(norm, c.name, c.input[1], rows=bool(attr(c, "transB", 0)))
    return None


def _tie_copies(readers: list[Reader], writers: list[Writer], consts) -> None:
    """A head whose weight holds exactly the embedding table's values (transposed) reads the table: the
    exporter stored a tied head twice (torch's legacy exporter does), and one rotated table serves both."""
    tables = {w.tensor: consts[w.tensor] for w in writers if w.op == "Gather"}
    for r in readers:
        if r.via or r.tensor in tables:
            continue
        w = consts[r.tensor]
        for name, t in tables.items():
            dims = list(t.dims)
            if list(w.dims) == (dims if r.rows else dims[::-1]) and w.data_type == t.data_type:
                a, b = ir.tensor_to_array(w), ir.tensor_to_array(t)
                if np.array_equal(a if r.rows else a.T, b):
                    r.copy, r.tensor, r.rows = r.tensor, name, True
                    break


def _shape_ok(c, consumers, consts, rank) -> bool:
    """A Shape of a stream tensor whose every use picks dimensions other than the last (batch, sequence)."""
    start, end = attr(c, "start", 0), attr(c, "end", None)
    last = rank - 1
    if end is not None and (end if end >= 0 else end + rank) <= last:
        return True
    if start < 0:
        start += rank
    for u in consumers.get(c.output[0], []):
        if u.op_type == "Gather" and u.input[0] == c.output[0] and u.input[1] in consts:
            idx = np.asarray(ir.tensor_to_array(consts[u.input[1]])).reshape(-1) + start
            if np.all((idx % rank) != last):
                continue
        return False
    return True


def attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def as_array(t: onnx.TensorProto) -> np.ndarray:
    return ir.tensor_to_array(t)
