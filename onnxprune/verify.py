"""Masked-reference verification: the pruned model must equal the original with removed channels zeroed.

The reference is the ORIGINAL model with a ``Where(mask, x, 0)`` after every
tensor that lost positions; both run in onnxruntime on the same batches. Any
mismatch beyond the tolerance is a bug in onnxprune, never a warning.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from . import ir, runtime
from .ir import wire
from .errors import OnnxPruneError

SHARE_WEIGHTS_BYTES = 2**28  # originals this large share their weights with the masked reference
# Relative tolerance for the pruned model run as deployed on another runtime or provider, whose kernels
# round differently from onnxruntime's CPU ones (OpenVINO CPU float32 on the rule-test graphs: <= 1e-5)
DEPLOYED_RTOL = 1e-3


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    scale: float          # max |reference|
    tolerance: float      # what was allowed: atol + rtol * scale
    passed: bool
    spread: float = float("inf")   # max - min of the reference's finite values on the verification inputs


@dataclass
class Verification:
    passed: bool
    outputs: list[OutputCheck] = field(default_factory=list)
    batches: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    error: str = ""
    # which runtime ran what: "pruned" (with taps) and "reference" on onnxruntime's CPU provider, and
    # "deployed" (the pruned model's outputs alone, on the target) when the target is anything else
    checked_by: dict = field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def needed_rtol(self) -> float:
        """The smallest relative tolerance that would have passed."""
        return max((o.max_abs / o.scale if o.scale else o.max_abs) for o in self.outputs) if self.outputs else 0.0

    def worst(self) -> OutputCheck | None:
        """The check closest to its tolerance (the one that decides how much margin there was)."""
        return max(self.outputs, key=lambda o: o.max_abs / o.tolerance if o.tolerance else o.max_abs, default=None)

    def nearly_constant(self, names) -> list[str]:
        """Of ``names``, the outputs whose reference hardly varied on the verification inputs (spread within the
        absolute tolerance): their agreement says little, e.g. a saturated sigmoid on random input."""
        return [o.name for o in self.outputs if o.name in set(names) and o.spread <= self.atol]

    def to_json(self) -> dict:
        return {"passed": self.passed, "batches": self.batches, "rtol": self.rtol, "atol": self.atol,
                "error": self.error, "checked_by": self.checked_by,
                "outputs": [{"name": o.name, "max_abs": o.max_abs, "scale": o.scale, "tolerance": o.tolerance,
                             "passed": o.passed, "spread": o.spread if np.isfinite(o.spread) else None}
                            for o in self.outputs]}


def reference_patch(original: onnx.ModelProto, removed: dict[str, tuple[int, np.ndarray]],
                    shapes: dict[str, list[int]]) -> onnx.GraphProto:
    """The masked reference as a patch of the original graph: every node (consumers of a masked
    tensor read its masked copy), a ``Where(keep, x, 0)`` after each tensor that lost positions,
    and the small keep/zero constants. See :func:`wire.splice`."""
    g = original.graph
    produced = {o for n in g.node for o in n.output}
    known = produced | {i.name for i in g.input} | {t.name for t in g.initializer}
    masked = {name: axis_pos for name, axis_pos in removed.items() if len(axis_pos[1]) and name in known}
    patch = onnx.GraphProto()
    types = runtime.tensor_types(original) if masked else {}
    rename = {name: f"{name}__masked" for name in masked}
    wheres = {}
    for name, (axis, positions) in masked.items():
        rank, n = len(shapes[name]), shapes[name][axis]
        keep = np.ones(n, dtype=bool)
        keep[positions] = False
        shape = [1] * rank
        shape[axis] = n
        dtype = ir.np_dtype(types[name].tensor_type.elem_type) if name in types else np.dtype(np.float32)
        patch.initializer.append(numpy_helper.from_array(keep.reshape(shape), f"{name}__keep"))
        patch.initializer.append(numpy_helper.from_array(np.zeros((), dtype=dtype), f"{name}__zero"))
        wheres[name] = onnx.helper.make_node("Where", [f"{name}__keep", name, f"{name}__zero"], [rename[name]],
                                             name=f"{name}__mask")
    patch.node.extend(wheres[n] for n in masked if n not in produced)  # graph inputs, initializers
    for node in g.node:
        new = patch.node.add()
        new.CopyFrom(node)
        _rename_inputs(new, rename)
        patch.node.extend(wheres[o] for o in node.output if o in wheres)
    return patch


def _rename_inputs(node: onnx.NodeProto, rename: dict[str, str]) -> None:
    """Point ``node``'s inputs (and those of its subgraphs, which may read outer tensors) at the renamed tensors."""
    for i, name in enumerate(node.input):
        if name in rename:
            node.input[i] = rename[name]
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs):
            for n in sub.node:
                _rename_inputs(n, rename)


def masked_reference(original: onnx.ModelProto, removed: dict[str, tuple[int, np.ndarray]],
                     shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The original model with ``removed`` positions of each named tensor forced to zero."""
    data = wire.splice(original.SerializeToString(), reference_patch(original, removed, shapes))
    return onnx.load_from_string(data)


def compare(candidate: onnx.ModelProto | bytes, reference: onnx.ModelProto | bytes,
            feeds: list[dict[str, np.ndarray]], rtol: float = 1e-4, atol: float = 1e-5,
            taps: dict[str, tuple[str, int, np.ndarray]] | None = None,
            reference_weights: onnx.ModelProto | None = None, *, external_dir: str | None = None,
            reference_names: set[str] | None = None,
            input_cuts: dict[str, tuple[int, np.ndarray]] | None = None) -> Verification:
    """Run both models on ``feeds`` and compare every output.

    Outputs of a low-precision float type (float16, bfloat16) are compared with a relative
    tolerance of at least 8 units in the last place of that type. ``reference_weights``
    supplies initializers the reference reads but lacks (see :func:`verify`).

    ``taps`` also compares intermediate tensors: candidate tensor name -> (reference tensor name,
    axis, positions to delete from the reference value), so a pruned layer whose effect on the
    outputs is tiny (e.g. a residual branch behind a 1e-6 layer scale) is still checked.

    Either model may be given serialized (bytes); ``external_dir`` is where the serialized
    reference's external data lives, ``reference_names`` the tensors it produces. ``input_cuts``
    names graph inputs that lost positions (KV caches): the candidate is fed them without those
    positions, the reference (which masks them) the whole feed.
    """
    have = _produced(candidate)
    have_ref = reference_names if reference_names is not None else _produced(reference)
    tapped = {r for r, _, _ in (taps or {}).values()}  # reference outputs that are taps, compared or not
    # dead branches are cleaned away from both models
    taps = {c: v for c, v in (taps or {}).items() if c in have and v[0] in have_ref}
    # one session at a time: the pruned model's outputs are kept and its session freed before the
    # reference's is made (building both at once was not faster on 2 cores, and holds both in memory)
    try:
        s_cand = _session(candidate, list(taps))
        checked_by = {"pruned": s_cand.describe()}
        outs = [o.name for o in s_cand.outputs if o.name not in taps]
        pairs = [(n, n, None, None) for n in outs] + [(c, r, ax, pos) for c, (r, ax, pos) in taps.items()]
        cut = input_cuts or {}
        cand_feeds = [{k: np.delete(v, cut[k][1], axis=cut[k][0]) if k in cut else v for k, v in feed.items()}
                      for feed in feeds]
        try:
            got = [runtime.run(s_cand, feed, [c for c, *_ in pairs]) for feed in cand_feeds]
        except Exception as e:
            return Verification(False, error=f"pruned model failed to run: {e}", rtol=rtol, atol=atol)
        del s_cand
        deployed = set()
        if not runtime.current().cpu_only:  # also as deployed: untapped, on the target (taps change its fusions)
            s_dep = _session(candidate, [], role="deployed")
            where = checked_by["deployed"] = s_dep.describe()
            try:
                for a, feed in zip(got, cand_feeds):
                    a.update({f"{n} [{where}]": v for n, v in runtime.run(s_dep, feed, outs).items()})
            except Exception as e:
                return Verification(False, error=f"pruned model failed to run in {where}: {e}", rtol=rtol,
                                    atol=atol, checked_by=checked_by)
            deployed = {f"{n} [{where}]" for n in outs}
            pairs += [(f"{n} [{where}]", n, None, None) for n in outs]
            del s_dep
        del candidate
        s_ref = _session(reference, [r for r, _, _ in taps.values()], reference_weights, external_dir)
        checked_by["reference"] = s_ref.describe()
        del reference
    except Exception as e:  # the candidate must load; if it does not, that is a failed verification
        return Verification(False, error=str(e), rtol=rtol, atol=atol)
    lost = [o.name for o in s_ref.outputs if o.name not in outs and o.name not in tapped and o.name not in taps]
    if lost:
        return Verification(False, error=f"the pruned model lacks output '{lost[0]}'", rtol=rtol, atol=atol)
    worst: dict[str, list[float]] = {c: [0.0, 0.0, max(rtol, DEPLOYED_RTOL) if c in deployed else rtol]
                                     for c, *_ in pairs}
    span: dict[str, tuple[float, float]] = {}   # min and max of each reference output
    for feed, a in zip(feeds, got):
        b = runtime.run(s_ref, feed, [r for _, r, _, _ in pairs])
        for n, r, ax, pos in pairs:
            y = np.asarray(b[r])
            if ax is not None:
                y = np.delete(y, pos, axis=ax)
            x = np.asarray(a[n])
            worst[n][2] = max(worst[n][2], _precision_rtol(x.dtype))
            if x.shape != y.shape:
                return Verification(False, error=f"output '{n}' has shape {list(x.shape)}, expected {list(y.shape)}",
                                    rtol=rtol, atol=atol)
            err, scale = _worst(x, y)
            worst[n][0] = max(worst[n][0], err)
            worst[n][1] = max(worst[n][1], scale)
            finite = y[np.isfinite(y)] if y.dtype.kind in "fc" else y
            if finite.size:
                lo, hi = span.get(n, (np.inf, -np.inf))
                span[n] = (min(lo, float(finite.min())), max(hi, float(finite.max())))
    checks = []
    for n, (err, scale, rel) in worst.items():
        tol = atol + rel * scale
        lo, hi = span.get(n, (0.0, float("inf")))
        checks.append(OutputCheck(n, err, scale, tol, err <= tol, hi - lo))
    return Verification(all(c.passed for c in checks), checks, len(feeds), rtol, atol, checked_by=checked_by)


def _worst(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(max |x - y| with NaN = NaN as equal and any other NaN as infinite, max finite |y|).

    float32 outputs are subtracted in float32 (exact where x and y are close, else within
    one part in 2**24 of the difference, far inside any tolerance); other types in float64."""
    work = np.float32 if x.dtype == np.float32 and y.dtype == np.float32 else np.float64
    x, y = x.astype(work, copy=False), y.astype(work, copy=False)
    diff = np.abs(x - y)
    err = float(diff.max(initial=0.0))
    scale = float(np.abs(y).max(initial=0.0))
    if np.isnan(err):  # the exact rule, only where a NaN occurs
        diff = np.where(np.isnan(x) & np.isnan(y), 0.0, diff)
        err = float(np.where(np.isnan(diff), np.inf, diff).max(initial=0.0))
    if not np.isfinite(scale):
        scale = float(np.abs(y[np.isfinite(y)]).max(initial=0.0))
    return err, scale


def _produced(model: onnx.ModelProto | bytes) -> set[str]:
    if isinstance(model, bytes):
        model = _graph_fields(model, (wire.NODE_FIELD,))
    return {o for n in model.graph.node for o in n.output}


def _precision_rtol(dtype: np.dtype) -> float:
    """8 units in the last place of a float type (0 for others)."""
    if dtype.name == "bfloat16":
        return 8 * 2.0 ** -7
    return 8 * float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _session(model: onnx.ModelProto | bytes, extra: list[str], weights: onnx.ModelProto | None = None,
             external_dir: str | None = None, role: str = "reference"):
    """A session with ``extra`` tensors as outputs, without layout transforms when there are any:
    onnxruntime's NCHWc pass can drop a tapped tensor (1.32: a Conv output feeding a fused Add)
    and then fails to load a model that loads fine untapped. Idle worker threads sleep rather than
    spin: a session run once or twice gains nothing from spinning, and on a busy machine spinning
    threads took a third of verification's CPU time (ResNet-50: 1.67 s -> 1.06 s wall at load 6).
    Both run in onnxruntime on the CPU (``role="reference"``); :func:`compare` also runs the pruned
    model where it will be deployed (see :mod:`onnxprune.runtime`)."""
    if isinstance(model, bytes):
        have = {o.name for o in _graph_fields(model, (wire.OUTPUT_FIELD,)).graph.output}
        missing = [n for n in extra if n not in have]
        data = wire.with_outputs(model, missing) if missing else model
        return runtime.session(data, role=role, layout=not extra, external_dir=external_dir, spinning=False)
    have = {o.name for o in model.graph.output}
    missing = [n for n in extra if n not in have]
    for n in missing:  # added for the session only (a tapped copy of the model would copy its weights)
        model.graph.output.add().name = n
    try:
        return runtime.session(model, role=role, weights=weights, layout=not extra, spinning=False)
    finally:
        if missing:
            del model.graph.output[len(model.graph.output) - len(missing):]


def verify(original: onnx.ModelProto | ir.Model, pruned: onnx.ModelProto,
           removed: dict[str, tuple[int, np.ndarray]], shapes: dict[str, list[int]],
           feeds: list[dict[str, np.ndarray]], rtol: float = 1e-4, atol: float = 1e-5, max_taps: int = 48, *,
           pruned_bytes: bytes | None = None) -> Verification:
    """Compare ``pruned`` with the masked original on ``feeds``: outputs and up to ``max_taps``
    intermediate tensors that lost channels (spread evenly over the graph).

    The masked reference is spliced from the serialized original (its file when ``original``
    is an :class:`ir.Model` whose file is unchanged; see :mod:`wire`), so its weights are never
    decoded or re-serialized; a reference to external data reads the original's data files.
    A large original held in memory (``SHARE_WEIGHTS_BYTES`` or more) gets a reference built
    from its weight-free skeleton that reads the original's weights when its session is made.
    ``pruned_bytes`` is ``pruned`` already serialized (it is not serialized again).
    An original that onnxruntime cannot run on ``feeds`` is the user's problem, not a failed
    verification: :class:`OnnxPruneError`.
    """
    proto = original.proto if isinstance(original, ir.Model) else original
    names = [n for n, (_, pos) in removed.items() if len(pos)]
    pick = names if len(names) <= max_taps else [names[i] for i in np.linspace(0, len(names) - 1, max_taps)
                                                     .round().astype(int)]
    outputs = {o.name for o in proto.graph.output}
    pick += [n for n in names if n in outputs and n not in pick]  # outputs that lost positions: always
    taps = {n: (f"{n}__masked", removed[n][0], removed[n][1]) for n in pick}
    inputs = {i.name for i in proto.graph.input}
    cuts = {n: removed[n] for n in names if n in inputs}
    patch = reference_patch(proto, removed, shapes)
    ref_names = {o for n in patch.node for o in n.output}
    for r, _, _ in taps.values():  # spliced in now rather than appended later (a second copy)
        if r in ref_names and r not in outputs:
            patch.output.add().name = r
    base, external_dir, weights = _reference_base(original)
    if isinstance(base, onnx.ModelProto):
        reference = onnx.load_from_string(wire.splice(base.SerializeToString(), patch))
    else:
        reference = wire.splice(base, patch)
        if isinstance(base, mmap.mmap):
            base.close()
    del base
    candidate = pruned_bytes if pruned_bytes is not None else pruned
    ver = compare(candidate, reference, feeds, rtol, atol, taps, reference_weights=weights,
                  external_dir=external_dir, reference_names=ref_names, input_cuts=cuts)
    if not ver.passed and ver.error:
        _require_runnable(proto, feeds[0] if feeds else None)
    return ver


def _reference_base(original: onnx.ModelProto | ir.Model):
    """(serialized original or its skeleton, folder of its external data, model supplying the weights)."""
    proto = original.proto if isinstance(original, ir.Model) else original
    mapped = ir.file_bytes(original, mapped=True) if isinstance(original, ir.Model) else None
    if mapped is not None and original.external:
        return mapped, str(original.path.parent), None
    if mapped is not None and ir.proto_bytes(proto) < SHARE_WEIGHTS_BYTES:
        return mapped, None, None
    if mapped is not None:
        mapped.close()
    if ir.proto_bytes(proto) >= SHARE_WEIGHTS_BYTES:
        return ir.skeleton(proto), None, proto
    return proto.SerializeToString(), None, None


def _graph_fields(data: bytes, numbers: tuple[int, ...]) -> onnx.ModelProto:
    """The GraphProto fields ``numbers`` of a serialized model, parsed without the rest (its weights)."""
    m = onnx.ModelProto()
    view = memoryview(data)
    for number, _, _, p, e in wire.fields(view):
        if number == wire.GRAPH_FIELD:
            m.graph.MergeFromString(b"".join(view[s:ge] for n, _, s, _, ge in wire.fields(view, p, e)
                                             if n in numbers))
    return m


def _require_runnable(original: onnx.ModelProto, feed: dict[str, np.ndarray] | None) -> None:
    """Raise :class:`OnnxPruneError` when onnxruntime cannot run the input model itself."""
    try:
        sess = runtime.session(original, role="reference", optimize=False)
        if feed is not None:
            sess.run(None, feed)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in (feed or {}).items())
        raise OnnxPruneError(f"onnxruntime cannot run the input model at {shapes or 'its input shapes'} "
                             f"({msg.removeprefix('onnxruntime cannot load the model: ')}); onnxprune verifies in "
                             "onnxruntime: fix the model, or pass --input-shape with real sizes") from None
