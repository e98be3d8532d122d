"""Masked-reference verification: the pruned model must equal the original with removed channels zeroed.

The reference is the ORIGINAL model with a ``Where(mask, x, 0)`` after every
tensor that lost positions; both run in onnxruntime on the same batches. Any
mismatch beyond the tolerance is a bug in onnxprune, never a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import ir, runtime
from .errors import OnnxPruneError

SHARE_WEIGHTS_BYTES = 2**28  # originals this large share their weights with the masked reference


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    scale: float          # max |reference|
    tolerance: float      # what was allowed: atol + rtol * scale
    passed: bool


@dataclass
class Verification:
    passed: bool
    outputs: list[OutputCheck] = field(default_factory=list)
    batches: int = 0
    rtol: float = 1e-4
    atol: float = 1e-5
    error: str = ""

    def __bool__(self) -> bool:
        return self.passed

    @property
    def needed_rtol(self) -> float:
        """The smallest relative tolerance that would have passed."""
        return max((o.max_abs / o.scale if o.scale else o.max_abs) for o in self.outputs) if self.outputs else 0.0

    def to_json(self) -> dict:
        return {"passed": self.passed, "batches": self.batches, "rtol": self.rtol, "atol": self.atol,
                "error": self.error,
                "outputs": [{"name": o.name, "max_abs": o.max_abs, "scale": o.scale, "tolerance": o.tolerance,
                             "passed": o.passed} for o in self.outputs]}


def masked_reference(original: onnx.ModelProto, removed: dict[str, tuple[int, np.ndarray]],
                     shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """The original model with ``removed`` positions of each named tensor forced to zero."""
    graph = ir.to_graph(original)
    tensors = graph.tensors()
    types = runtime.tensor_types(original)
    for name, (axis, positions) in removed.items():
        if len(positions) == 0 or name not in tensors:
            continue
        t = tensors[name]
        rank = len(shapes[name])
        n = shapes[name][axis]
        consumers = list(t.outputs)
        dtype = ir.np_dtype(types[name].tensor_type.elem_type) if name in types else np.dtype(np.float32)
        keep = np.ones(n, dtype=bool)
        keep[positions] = False
        shape = [1] * rank
        shape[axis] = n
        mask = gs.Constant(f"{name}__keep", keep.reshape(shape))
        zero = gs.Constant(f"{name}__zero", np.zeros((), dtype=dtype))
        masked = gs.Variable(f"{name}__masked", dtype=dtype)
        graph.nodes.append(gs.Node("Where", f"{name}__mask", inputs=[mask, t, zero], outputs=[masked]))
        for c in consumers:
            for i, inp in enumerate(c.inputs):
                if inp is t:
                    c.inputs[i] = masked
    return ir.from_graph(graph, original)


def compare(candidate: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
            rtol: float = 1e-4, atol: float = 1e-5,
            taps: dict[str, tuple[str, int, np.ndarray]] | None = None,
            reference_weights: onnx.ModelProto | None = None) -> Verification:
    """Run both models on ``feeds`` and compare every output.

    Outputs of a low-precision float type (float16, bfloat16) are compared with a relative
    tolerance of at least 8 units in the last place of that type. ``reference_weights``
    supplies initializers the reference reads but lacks (see :func:`verify`).

    ``taps`` also compares intermediate tensors: candidate tensor name -> (reference tensor name,
    axis, positions to delete from the reference value), so a pruned layer whose effect on the
    outputs is tiny (e.g. a residual branch behind a 1e-6 layer scale) is still checked.
    """
    have = {o for n in candidate.graph.node for o in n.output}
    have_ref = {o for n in reference.graph.node for o in n.output}
    # dead branches are cleaned away from both models
    taps = {c: v for c, v in (taps or {}).items() if c in have and v[0] in have_ref}
    try:
        s_cand, s_ref = _sessions(candidate, reference, taps, reference_weights)
    except Exception as e:  # the candidate must load; if it does not, that is a failed verification
        return Verification(False, error=str(e), rtol=rtol, atol=atol)
    outs = [o.name for o in s_ref.get_outputs() if o.name not in {r for r, _, _ in taps.values()}]
    pairs = [(n, n, None, None) for n in outs] + [(c, r, ax, pos) for c, (r, ax, pos) in taps.items()]
    worst: dict[str, list[float]] = {c: [0.0, 0.0, rtol] for c, *_ in pairs}
    for feed in feeds:
        try:
            a = runtime.run(s_cand, feed, [c for c, *_ in pairs])
        except Exception as e:
            return Verification(False, error=f"pruned model failed to run: {e}", rtol=rtol, atol=atol)
        b = runtime.run(s_ref, feed, [r for _, r, _, _ in pairs])
        for n, r, ax, pos in pairs:
            y = np.asarray(b[r], dtype=np.float64)
            if ax is not None:
                y = np.delete(y, pos, axis=ax)
            worst[n][2] = max(worst[n][2], _precision_rtol(np.asarray(a[n]).dtype))
            x = np.asarray(a[n], dtype=np.float64)
            if x.shape != y.shape:
                return Verification(False, error=f"output '{n}' has shape {list(x.shape)}, expected {list(y.shape)}",
                                    rtol=rtol, atol=atol)
            both_nan = np.isnan(x) & np.isnan(y)
            diff = np.where(both_nan, 0.0, np.abs(x - y))
            diff = np.where(np.isnan(diff), np.inf, diff)
            finite = np.isfinite(y)
            worst[n][0] = max(worst[n][0], float(diff.max(initial=0.0)))
            worst[n][1] = max(worst[n][1], float(np.abs(y[finite]).max(initial=0.0)))
    checks = []
    for n, (err, scale, rel) in worst.items():
        tol = atol + rel * scale
        checks.append(OutputCheck(n, err, scale, tol, err <= tol))
    return Verification(all(c.passed for c in checks), checks, len(feeds), rtol, atol)


def _precision_rtol(dtype: np.dtype) -> float:
    """8 units in the last place of a float type (0 for others)."""
    if dtype.name == "bfloat16":
        return 8 * 2.0 ** -7
    return 8 * float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _sessions(candidate: onnx.ModelProto, reference: onnx.ModelProto, taps: dict,
              weights: onnx.ModelProto | None = None):
    """Sessions for both models with the taps as extra outputs, without layout transforms:
    onnxruntime's NCHWc pass can drop a tapped tensor (1.32: a Conv output feeding a fused Add)
    and then fails to load a model that loads fine untapped."""
    if not taps:
        return runtime.session(candidate), runtime.session(reference, weights=weights)
    cand_t = runtime.with_outputs(candidate, list(taps))
    ref_t = runtime.with_outputs(reference, [r for r, _, _ in taps.values()])
    return runtime.session(cand_t, layout=False), runtime.session(ref_t, weights=weights, layout=False)


def verify(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: dict[str, tuple[int, np.ndarray]],
           shapes: dict[str, list[int]], feeds: list[dict[str, np.ndarray]], rtol: float = 1e-4,
           atol: float = 1e-5, max_taps: int = 48) -> Verification:
    """Compare ``pruned`` with the masked original on ``feeds``: outputs and up to ``max_taps``
    intermediate tensors that lost channels (spread evenly over the graph).

    The masked reference of a large original (``SHARE_WEIGHTS_BYTES`` or more) is built from
    its weight-free skeleton and reads the original's weights when its session is made, so
    verification never holds a second copy of them. An original that onnxruntime cannot run
    on ``feeds`` is the user's problem, not a failed verification: :class:`OnnxPruneError`.
    """
    names = [n for n, (_, pos) in removed.items() if len(pos)]
    pick = names if len(names) <= max_taps else [names[i] for i in np.linspace(0, len(names) - 1, max_taps)
                                                     .round().astype(int)]
    taps = {n: (f"{n}__masked", removed[n][0], removed[n][1]) for n in pick}
    share = ir.proto_bytes(original) >= SHARE_WEIGHTS_BYTES
    reference = masked_reference(ir.skeleton(original) if share else original, removed, shapes)
    ver = compare(pruned, reference, feeds, rtol, atol, taps, reference_weights=original if share else None)
    if not ver.passed and ver.error:
        _require_runnable(original, feeds[0] if feeds else None)
    return ver


def _require_runnable(original: onnx.ModelProto, feed: dict[str, np.ndarray] | None) -> None:
    """Raise :class:`OnnxPruneError` when onnxruntime cannot run the input model itself."""
    try:
        sess = runtime.session(original, optimize=False)
        if feed is not None:
            sess.run(None, feed)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        shapes = ", ".join(f"{k}={'x'.join(map(str, v.shape))}" for k, v in (feed or {}).items())
        raise OnnxPruneError(f"onnxruntime cannot run the input model at {shapes or 'its input shapes'} "
                             f"({msg.removeprefix('onnxruntime cannot load the model: ')}); onnxprune verifies in "
                             "onnxruntime: fix the model, or pass --input-shape with real sizes") from None
