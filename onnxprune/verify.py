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
            rtol: float = 1e-4, atol: float = 1e-5) -> Verification:
    """Run both models on ``feeds`` and compare every output."""
    try:
        s_cand = runtime.session(candidate)
        s_ref = runtime.session(reference)
    except Exception as e:  # the candidate must load; if it does not, that is a failed verification
        return Verification(False, error=str(e), rtol=rtol, atol=atol)
    names = [o.name for o in s_ref.get_outputs()]
    worst: dict[str, list[float]] = {n: [0.0, 0.0] for n in names}
    for feed in feeds:
        try:
            a = runtime.run(s_cand, feed, names)
        except Exception as e:
            return Verification(False, error=f"pruned model failed to run: {e}", rtol=rtol, atol=atol)
        b = runtime.run(s_ref, feed, names)
        for n in names:
            x, y = np.asarray(a[n], dtype=np.float64), np.asarray(b[n], dtype=np.float64)
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
    for n, (err, scale) in worst.items():
        tol = atol + rtol * scale
        checks.append(OutputCheck(n, err, scale, tol, err <= tol))
    return Verification(all(c.passed for c in checks), checks, len(feeds), rtol, atol)


def verify(original: onnx.ModelProto, pruned: onnx.ModelProto, removed: dict[str, tuple[int, np.ndarray]],
           shapes: dict[str, list[int]], feeds: list[dict[str, np.ndarray]], rtol: float = 1e-4,
           atol: float = 1e-5) -> Verification:
    """Compare ``pruned`` with the masked original on ``feeds``."""
    return compare(pruned, masked_reference(original, removed, shapes), feeds, rtol, atol)
