"""Channel-dependency analysis: propagate channel ids through the graph, one rule per op.

The driver visits nodes in topological order and hands each to its rule in
``rules.RULES``. Ids coupled by a rule are merged (union-find); ids that reach
a barrier (an op without a rule, a case a rule cannot prove, a subgraph, a
graph output) are fixed. At the end, ids that were allocated together by one
layer and every id coupled to them form a group; a group with any fixed id is
frozen, with the reasons collected on the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir, runtime
from .errors import OnnxPruneError
from .data.readers import random_feed
from .groups import ACTIVATION, Analysis, Barrier, Group, Member
from .rules import NodeCtx, Unsupported, lookup
from .rules.base import FIXED, Label, UnionFind
from .rules.taint import carry, static_or_const

# inputs that carry shapes, sizes, bounds or axes: a computed value there can be folded to a constant
SHAPE_INPUTS = {"Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "Resize": (1, 2, 3),
                "Pad": (1, 2, 3), "Tile": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Gather": (1,),
                "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
                "ReduceL1": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,), "ReduceLogSum": (1,),
                "ReduceLogSumExp": (1,), "CumSum": (1,), "TopK": (1,)}
# ops through which a value read from a tensor's shape keeps being shape arithmetic
SHAPE_ARITH = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Div", "Mul", "Add", "Sub",
               "Slice", "Identity", "Floor", "Ceil", "Mod", "Max", "Min", "ReduceProd", "Neg", "Abs", "Sqrt",
               "Reshape", "Equal", "Where", "Pow", "Reciprocal", "ConstantOfShape", "Range", "Expand", "Tile",
               "Less", "Greater", "Not", "And", "Or"}
VARIES = "changes with a symbolic input dimension"
SMALL = 64  # elements: shape arithmetic produces a handful of numbers; anything bigger is data

# why common ops without a rule stop channels (the default reason is "no rule for this op")
NO_RULE = {op: "quantized tensors keep their channels (prune the float model, then quantize)"
           for op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
                      "ConvInteger", "MatMulInteger")}
NO_RULE.update({op: "control flow: values entering its subgraph keep their shape" for op in ("Loop", "Scan")})
NO_RULE_LAYERS = ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")  # reported even if untouched


@dataclass
class _Record:
    tensor: str
    axis: int
    ids: np.ndarray
    kind: str
    node: str
    op: str
    input_index: int


# KV caches cross the graph boundary: inputs past_key_values.* / past_*, outputs present.*
KV_INPUT = re.compile(r"^past(_key_values)?[._]")
KV_OUTPUT = re.compile(r"^present[._]")
KV_FLAG = "--kv-cache"


@dataclass
class Options:
    split_carrier: str = "largest"   # or "outer": prune whole attention heads
    kv_cache: bool = False           # KV-cache graph inputs/outputs may shrink with their heads


class _Driver:
    def __init__(self, graph: gs.Graph, shapes: dict, observed: dict, opset: int, options: Options):
        self.graph = graph
        self.shapes = shapes
        self.observed = observed
        self.static: set[str] = set()
        self.varies: dict[str, np.ndarray] = {}   # observed value -> mask of elements read at run time
        self.shape_valued: set[str] = set()       # small tensors computed only from shapes and constants
        self.vary_note = VARIES                    # how an element read at run time is described
        self.read_runtime_values = False           # a rule or a fold used an observed value
        self.structure_notes: list[tuple[np.ndarray, str]] = []   # (ids, head | head_dim) from split axes
        # values read from these channels' count: (ids, where, element positions holding it or None = any)
        self.taint: dict[str, list[tuple[np.ndarray, str, frozenset | None]]] = {}
        self.opset = opset
        self.options = options
        self.uf = UnionFind()
        self.labels: dict[str, Label] = {}
        self.records: list[_Record] = []
        self.fix_log: list[tuple[np.ndarray, str]] = []
        self.barriers: list[Barrier] = []
        self.fixups: list = []
        self.graph_inputs = {t.name for t in graph.inputs}

    def boundary_ids(self, t: gs.Tensor, axis: int, node: gs.Node) -> np.ndarray | None:
        """Ids for ``axis`` of an unlabelled KV-cache graph input that a rule couples with channels.

        The input gets its own ids (a label on that axis, recorded as a member), so the group it
        joins can shrink it when ``kv_cache`` is on; without it the ids are fixed with a reason
        naming the flag. None for any other tensor."""
        chain = [t]   # the input itself, or a copy of it (Identity, Cast, a one-input Concat)
        while chain[-1].inputs and len(chain[-1].inputs) == 1:
            prod = chain[-1].inputs[0]
            live = [x for x in prod.inputs if x.name]
            if prod.op not in ("Identity", "Cast", "Concat") or len(live) != 1:
                break
            chain.append(live[0])
        src = chain[-1]
        if src.name not in self.graph_inputs or not KV_INPUT.match(src.name) or \
                any(x.name in self.labels for x in chain):
            return None
        ids = self.uf.new(self.shape_of(src)[axis])
        for x in reversed(chain):
            self.set_label(x, axis, ids, x.inputs[0] if x.inputs else node)
        if not self.options.kv_cache:
            self.fix(ids, f"KV-cache input '{src.name}' keeps its shape ({KV_FLAG} lets it shrink with its heads)")
        return ids

    # -------------------------------------------------- services for NodeCtx
    def shape_of(self, t: gs.Tensor) -> list[int]:
        if isinstance(t, gs.Constant):
            return list(t.shape)  # without loading the values: weights stay lazy
        s = self.shapes.get(t.name)
        if s is None or any(d is None for d in s):
            raise Unsupported(f"shape of '{t.name}' is unknown")
        return list(s)

    def observed_value(self, name: str):
        return self.observed.get(name)

    def static_value(self, name: str):
        return self.observed.get(name) if name in self.static else None

    def elements(self, name: str):
        """(observed value, mask of elements that change with the symbolic input dims) or None."""
        v = self.observed.get(name)
        if v is None:
            return None
        self.read_runtime_values = True
        return v, self.varies.get(name, np.zeros(v.shape, dtype=bool))

    def read_channel_count(self, out: gs.Tensor, ids: np.ndarray, where: str, position: int | None = None) -> None:
        """``out`` holds a number computed from a channel count: follow it until it is folded or used."""
        pos = None if position is None else frozenset([position])
        self.taint.setdefault(out.name, []).append((ids, where, pos))

    def set_label(self, t: gs.Tensor, axis: int, ids: np.ndarray, node: gs.Node) -> None:
        if len(ids) != self.shape_of(t)[axis]:
            raise Unsupported(f"label of '{t.name}' has {len(ids)} positions, axis {axis} has "
                              f"{self.shape_of(t)[axis]}")
        self.labels[t.name] = Label(axis, ids)
        self.records.append(_Record(t.name, axis, ids, ACTIVATION, node.name, node.op, -1))

    def add_member(self, tensor: str, axis: int, ids: np.ndarray, kind: str, node: gs.Node, idx: int) -> None:
        self.records.append(_Record(tensor, axis, ids, kind, node.name, node.op, idx))

    def fix(self, ids: np.ndarray, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[ids != FIXED]
        if len(ids) == 0:
            return
        self.fix_log.append((ids.copy(), reason))

    # -------------------------------------------------- the walk
    def run(self) -> None:
        for node in self.graph.nodes:
            self.visit(node)
        for t in self.graph.outputs:
            lab = self.labels.get(t.name)
            if lab is not None and KV_OUTPUT.match(t.name):
                if not self.options.kv_cache:
                    self.fix(lab.ids, f"KV-cache output '{t.name}' keeps its shape ({KV_FLAG} lets it shrink "
                                      "with its heads)")
            elif lab is not None:
                self.fix(lab.ids, f"graph output '{t.name}' keeps its shape")
            for ids, where, _ in self.taint.get(t.name, []):
                self.fix(ids, f"{where}: its channel count reaches graph output '{t.name}'")

    def visit(self, node: gs.Node) -> None:
        outer = [n for n in _outer_names(node) if n in self.labels]
        for name in outer:
            self.fix(self.labels[name].ids, f"{node.op} '{node.name}': read inside a subgraph")
        self._mark_shape_valued(node)
        self._follow_taint(node)
        fn = lookup(node.domain, node.op)
        if fn is None:
            reason = NO_RULE.get(node.op, "no rule for this op") if node.domain in ("", "ai.onnx", None) else \
                f"op from custom domain '{node.domain}'"
            self._barrier(node, "reads channel-carrying tensors inside its subgraphs" if outer else reason,
                          touched=bool(outer) or node.op in NO_RULE_LAYERS)
            return
        mark = (len(self.records), len(self.fixups))
        ctx = NodeCtx(self, node)
        try:
            fn(ctx)
        except Unsupported as e:
            new = self.records[mark[0]:]
            for r in new:
                self.fix(r.ids, f"{node.op} '{node.name}': {e}")
            del self.records[mark[0]:]
            del self.fixups[mark[1]:]
            for o in node.outputs:
                self.labels.pop(o.name, None)
            # a layer that declines is reported even when nothing prunable reaches it: its own channels stay
            self._barrier(node, str(e), touched=node.op in ir.WEIGHT_OPS)

    def _follow_taint(self, node: gs.Node) -> None:
        """Channel counts read at run time flow through shape arithmetic; where they leave it (a shape
        input, or data such as an attention scale) the elements that hold them are set to their
        observed value, which the node's rule may then refine (e.g. a Reshape target's new size).
        An element that also changes with a symbolic dimension cannot be set: it freezes its channels."""
        tainted = [(i, t) for i, t in enumerate(node.inputs) if t.name in self.taint]
        if not tainted:
            return
        foldable = SHAPE_INPUTS.get(node.op, ())
        for i, t in tainted:
            if i not in foldable and node.outputs and node.outputs[0].name in self.shape_valued:
                self._carry_taint(node, i, t)
            else:
                self._fold(node, i, t)

    def _carry_taint(self, node: gs.Node, i: int, t: gs.Tensor) -> None:
        """Pass the count on to the elements of the outputs that still hold it (none: it is gone)."""
        value_of = static_or_const(self)
        for k, o in enumerate(node.outputs):
            for ids, where, pos in self.taint[t.name]:
                new = carry(node, i, pos, value_of, self._shape_or_none) if k == 0 else None
                if new is None or len(new):
                    self.taint.setdefault(o.name, []).append((ids, where, new))

    def _shape_or_none(self, t: gs.Tensor):
        if isinstance(t, gs.Constant):
            return list(t.shape)
        s = self.shapes.get(t.name)
        return None if s is None or any(d is None for d in s) else list(s)

    def _mark_shape_valued(self, node: gs.Node) -> None:
        """Shape arithmetic: a Shape or Size, or a small result of SHAPE_ARITH ops whose run-time
        inputs are all shape arithmetic. Data (an activation, even a small one) never is."""
        if node.domain not in ("", "ai.onnx", None) or node.op not in SHAPE_ARITH or not self._small(node):
            return
        live = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if node.op in ("Shape", "Size") or all(t.name in self.shape_valued for t in live):
            self.shape_valued.update(o.name for o in node.outputs if o.name)

    def _small(self, node: gs.Node) -> bool:
        """Shape arithmetic produces a handful of numbers; anything bigger is data."""
        for o in node.outputs:
            s = self.shapes.get(o.name)
            if s is None or any(d is None for d in s) or int(np.prod(s)) > SMALL:
                return False
        return True

    def _fold(self, node: gs.Node, i: int, t: gs.Tensor) -> None:
        """Set the elements of input ``i`` that hold channel counts to their observed values."""
        entries = self.taint[t.name]
        el = self.elements(t.name)
        use = f"{node.op} '{node.name}'"
        if el is None:
            for ids, where, _ in entries:
                self.fix(ids, f"{where}: its channel count is used at run time by {use}")
            return
        value, varies = el
        mask = np.zeros(value.size, dtype=bool)
        for ids, where, pos in entries:
            sel = np.ones(value.size, dtype=bool) if pos is None else \
                np.isin(np.arange(value.size), np.fromiter(pos, dtype=np.int64, count=len(pos)))
            if (sel & varies.reshape(-1)).any():
                self.fix(ids, f"{where}: its channel count is combined with a value that {self.vary_note}, "
                              f"in the input of {use}")
            else:
                mask |= sel
        if not mask.any():
            return
        mask = mask.reshape(value.shape)

        def fold(view):
            view.set_elements(node, i, value, mask)
        self.fixups.append((node, fold))  # runs before the node's own fixups, which may refine it

    def _barrier(self, node: gs.Node, reason: str, touched: bool = False) -> None:
        for t in node.inputs:
            lab = self.labels.get(t.name)
            if lab is not None:
                self.fix(lab.ids, f"{node.op} '{node.name}': {reason}")
                touched = True
        if touched:
            self.barriers.append(Barrier(node.name, node.op, reason))

    # -------------------------------------------------- groups
    def _roles(self, roots: np.ndarray, comp: np.ndarray) -> dict[int, str]:
        """Component -> head | kv_head | head_dim from the split notes. A head split whose positions were
        merged by coupling (several query heads reading one KV head) marks KV heads."""
        roles: dict[int, str] = {}
        for ids, role in self.structure_notes:
            live = ids[ids != FIXED]
            if not len(live):
                continue
            r = roots[live]
            if role == "head" and len(np.unique(r)) < len(r):
                role = "kv_head"
            for c in set(comp[r].tolist()):
                if roles.get(c) not in ("kv_head", "head"):
                    roles[c] = role
        return roles

    def groups(self) -> list[Group]:
        n = len(self.uf.parent)
        if n <= 1:
            return []
        roots = self.uf.find_all(np.arange(n))
        comp = _components(self.uf.block, roots)
        fixed_comp = {int(c) for ids, _ in self.fix_log for c in np.unique(comp[ids])}
        reasons: dict[int, list[str]] = {}
        for ids, reason in self.fix_log:
            for c in set(comp[ids].tolist()):
                lst = reasons.setdefault(c, [])
                if reason not in lst and len(lst) < 8:
                    lst.append(reason)
        # number each component's classes in order of first appearance
        chan = np.full(n, -1, dtype=np.int64)
        count: dict[int, int] = {}
        for rec in self.records:
            r = roots[rec.ids]
            for root in dict.fromkeys(r[r != FIXED].tolist()):
                if chan[root] < 0:
                    c = int(comp[root])
                    chan[root] = count.get(c, 0)
                    count[c] = int(chan[root]) + 1
        by_comp: dict[int, Group] = {}
        for rec in self.records:
            r = roots[rec.ids]
            cs = comp[r]
            live = r != FIXED
            for c in dict.fromkeys(cs[live].tolist()):
                g = by_comp.get(c)
                if g is None:
                    g = by_comp[c] = Group(id=len(by_comp), size=count[c], frozen=c in fixed_comp,
                                           reasons=reasons.get(c, []))
                index = np.where(live & (cs == c), chan[r], -1).astype(np.int64)
                g.members.append(Member(rec.tensor, rec.axis, index, rec.kind, rec.node, rec.op, rec.input_index))
        groups = list(by_comp.values())
        roles = self._roles(roots, comp)
        comp_of = {g.id: c for c, g in by_comp.items()}
        for g in groups:
            g.label = next((m.node for m in g.members if m.kind == "weight_out"), g.members[0].node)
            g.structure = _structure(g, roles.get(comp_of[g.id], ""))
            if g.frozen and not g.reasons:
                g.reasons = ["coupled with fixed channels"]
        return groups


def _structure(g: Group, role: str) -> str:
    """What a group's channels are: attention heads (kv_head when query heads share them), dimensions
    within every head, convolution channels, or units of a dense layer (ffn)."""
    if role:
        return role
    ops = {m.op for m in g.members if m.kind == "weight_out"}
    if ops & {"Conv", "ConvTranspose"}:
        return "conv_channel"
    return "ffn" if ops & {"MatMul", "Gemm"} else "channel"


def _components(space: np.ndarray, roots: np.ndarray) -> np.ndarray:
    """Union allocation spaces that share any class; returns the component of every id."""
    n = len(roots)
    parent = np.arange(space.max() + 1)

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    first_space_of_root: dict[int, int] = {}
    for i in range(n):
        r = int(roots[i])
        s = int(space[i])
        if r in first_space_of_root:
            a, b = find(first_space_of_root[r]), find(s)
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_space_of_root[r] = s
    return np.array([find(int(s)) for s in space], dtype=np.int64)


def _outer_names(node: gs.Node) -> set[str]:
    """Names a node's subgraphs read from the enclosing graph."""
    names: set[str] = set()
    for v in node.attrs.values():
        graphs = v if isinstance(v, list) else [v]
        for g in graphs:
            if isinstance(g, gs.Graph):
                produced = {t.name for n in g.nodes for t in n.outputs} | {t.name for t in g.inputs}
                for n in g.nodes:
                    names |= {t.name for t in n.inputs if t.name and t.name not in produced
                              and not isinstance(t, gs.Constant)}
                    names |= _outer_names(n) - produced
    return names


# ---------------------------------------------------------------- entry point

def prepare(model: ir.Model | onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None):
    """Concrete shapes (inference, then one onnxruntime run for what it leaves open) and observed shape values."""
    proto = model.proto if isinstance(model, ir.Model) else model
    shapes_in = ir.resolve_input_shapes(proto, input_shapes)
    graph = ir.to_graph(proto)
    shapes = ir.infer_shapes(proto, shapes_in)
    want_values = set()
    for node in graph.nodes:
        for i in SHAPE_INPUTS.get(node.op, ()):
            if i < len(node.inputs) and isinstance(node.inputs[i], gs.Variable) and node.inputs[i].name:
                want_values.add(node.inputs[i].name)
        if node.op in SHAPE_ARITH:  # small results of shape arithmetic: their values may be folded
            for o in node.outputs:
                s = shapes.get(o.name)
                if o.name and (s is None or None in s or int(np.prod(s)) <= SMALL):
                    want_values.add(o.name)
    unknown = {t.name for n in graph.nodes for t in n.outputs
               if t.name and (shapes.get(t.name) is None or any(d is None for d in shapes[t.name]))}
    observed: dict[str, np.ndarray] = {}
    varies: dict[str, np.ndarray] = {}
    vary_note, ran = VARIES, None
    need = sorted(want_values | unknown)
    if need:  # only graphs whose shapes depend on run-time values pay for an onnxruntime run
        fixed = ir.with_input_shapes(proto, shapes_in)
        sess = runtime.session(runtime.with_outputs(fixed, need), optimize=False)
        try:
            vals = runtime.run(sess, random_feed(fixed, shapes_in), need)
        except Exception as e:  # e.g. a symbolic channel or image size that defaulted to 1
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            at = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes_in.items())
            raise OnnxPruneError(f"onnxruntime cannot run the model at {at} ({msg}); give real sizes with "
                                 "--input-shape NAME=DIMS") from None
        for name, v in vals.items():
            shapes[name] = list(v.shape)
            if name in want_values and v.size <= SMALL and v.dtype.kind in "iufb":
                observed[name] = v
        varies, vary_note, ran = _varying_elements(proto, shapes_in, observed)
    return graph, shapes, observed, (varies, vary_note, ran), shapes_in


def _varying_elements(proto: onnx.ModelProto, shapes_in: dict, observed: dict
                      ) -> tuple[dict[str, np.ndarray], str, dict | None]:
    """For each observed value, the elements that change when the symbolic input dimensions do
    (the others are safe to fold), and how such an element is described in a reason.

    A size given with --input-shape is where the analysis runs, not a promise: the saved model
    keeps the symbolic dimension, so it is varied too (doubled, which keeps strides dividing it).
    All symbolic dimensions are doubled at once; if the model cannot run so (an image whose channel
    count is symbolic too), each dimension (by name) is doubled alone, and one the model cannot run
    with doubled is taken as fixed when the sizes given for it agree (then the model only runs at
    that size); sizes that disagree leave every element as possibly varying."""
    dims_of: dict[str, list[tuple[str, int]]] = {}   # dimension name -> (input, axis) positions
    for vi in ir.graph_inputs(proto):
        for k, d in enumerate(ir.input_dims(vi)):
            if not (isinstance(d, int) and d > 0):
                dims_of.setdefault(d if isinstance(d, str) and d else f"{vi.name}:{k}", []).append((vi.name, k))
    none = {n: np.zeros(v.shape, dtype=bool) for n, v in observed.items()}
    if not dims_of or not observed:
        return none, VARIES, None
    names = sorted(observed)

    def changed(which: list[str]):
        shapes = {k: list(v) for k, v in shapes_in.items()}
        for d in which:
            for name, k in dims_of[d]:
                shapes[name][k] *= 2
        try:
            fixed = ir.with_input_shapes(proto, shapes)
            sess = runtime.session(runtime.with_outputs(fixed, names), optimize=False)
            vals = runtime.run(sess, random_feed(fixed, shapes), names)
        except Exception as e:
            return None, (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return {n: _differ(observed[n], vals[n]) for n in names}, shapes

    out, ran = changed(list(dims_of))
    if out is not None:
        return out, VARIES, ran
    consistent = all(len({shapes_in[name][k] for name, k in pos}) == 1 for pos in dims_of.values())
    runs = [changed([d]) for d in dims_of] if len(dims_of) > 1 and consistent else []
    ok = [r for r in runs if r[0] is not None]
    if not ok:
        note = f"may change with a symbolic input dimension: the model did not run with them doubled " \
               f"({ran}); --input-shape with consistent sizes may help"
        return {n: np.ones(v.shape, dtype=bool) for n, v in observed.items()}, note, None
    return {n: np.logical_or.reduce([r[n] for r, _ in ok]) for n in names}, VARIES, ok[0][1]


def _differ(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.shape != b.shape:
        return np.ones(a.shape, dtype=bool)
    return ~np.isclose(a, b, rtol=1e-6, atol=0) if a.dtype.kind == "f" else a != b


def analyze(model: ir.Model | onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
            *, split_carrier: str = "largest", kv_cache: bool = False) -> Analysis:
    """Find every group of coupled channels in ``model``.

    Graph inputs and outputs keep their shapes, except with ``kv_cache``: KV-cache inputs
    (``past_key_values.*``, ``past_*``) and outputs (``present.*``) then shrink with the heads
    they carry, and the pruned model declares their new shapes."""
    proto = model.proto if isinstance(model, ir.Model) else model
    graph, shapes, observed, (varies, vary_note, ran), shapes_in = prepare(proto, input_shapes)
    opset = next((i.version for i in proto.opset_import if i.domain in ("", "ai.onnx")), 0)
    if split_carrier not in ("largest", "outer"):
        raise OnnxPruneError(f"split carrier '{split_carrier}': expected largest or outer")
    d = _Driver(graph, shapes, observed, opset, Options(split_carrier=split_carrier, kv_cache=kv_cache))
    d.varies, d.vary_note = varies, vary_note
    d.static = {n for n, m in varies.items() if not m.any()}
    d.run()
    groups = d.groups()
    return Analysis(groups=groups, barriers=d.barriers, shapes=shapes, input_shapes=shapes_in,
                    channel_axes=d.labels, fixups=d.fixups, kv_cache=kv_cache,
                    varied_shapes=ran if d.read_runtime_values else None)
