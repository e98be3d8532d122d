"""Least-squares refits solved from Gram matrices the scoring pass already gathered: no pass at all.

A refit that takes its input from the ORIGINAL model restricted to the kept channels (every refit
of the first dependency level, and ThiNet-style every later one; see ``reconstruct``) and its
target from the original layer's own output needs nothing but ``[X 1]ᵀ[X 1]`` of the original
input: the target is ``Y = X Wᵀ + b`` of the same rows, so with ``K`` the kept columns

    cov(X_K) W'ᵀ = cov(X_K, X) Wᵀ   (+ ridge towards the pruned weights),   b' = E[Y] − W' E[X_K].

``obs`` and ``lasso`` already gather ``XᵀX`` (and its column sums) of every consumer layer's input,
so ``--criterion auto`` judges each candidate with this refit for the cost of solving, and one run
of the candidate on the held-out samples. It is the one-stage reconstruction without the pruned
model's passes and without per-layer held-out checks: a proxy, measured end to end.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import ir
from . import layers


def refit(original: onnx.ModelProto, pruned: onnx.ModelProto, kept_inputs: dict[str, np.ndarray],
          grams: dict[str, tuple[np.ndarray, np.ndarray, int]], kept_outputs: dict[str, np.ndarray] | None = None,
          ridge: float = 1e-3) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Refit the layers of ``pruned`` named in ``kept_inputs`` from ``grams[first output of the
    original layer] = (XᵀX [1, D, D], Σx [1, D], rows)``. Returns the model and, per layer, "refit"
    or why not."""
    work = ir.to_graph(pruned)
    nodes = {n.name: n for n in work.nodes}
    refs = {n.name: n for n in ir.to_graph(original).nodes}
    done: dict[str, str] = {}
    for name, kin in kept_inputs.items():
        node, ref = nodes.get(name), refs.get(name)
        if node is None or ref is None:
            done[name] = "not in both models"
            continue
        lin, why = layers.linear(node)
        olin, owhy = layers.linear(ref)
        g = grams.get(ref.outputs[0].name) if ref.outputs else None
        if lin is None or olin is None or g is None:
            done[name] = why or owhy or "no Gram matrix for its input"
            continue
        if len(node.inputs[1].outputs) > 1:
            done[name] = "its weight is shared"
            continue
        if olin.groups != 1 or lin.groups != 1:
            done[name] = "grouped convolution: the kept groups' inputs are unchanged"
            continue
        kin = np.sort(np.asarray(kin, dtype=np.int64).reshape(-1))
        kout = (kept_outputs or {}).get(name)
        if kout is None:
            kout = np.arange(lin.cout) if lin.cout == olin.cout else layers.match_rows(olin.signatures(kin),
                                                                                       lin.signatures())
        if kout is None:
            done[name] = "cannot match output channels"
            continue
        h, sx, n = g
        cols = (kin[:, None] * olin.kernel + np.arange(olin.kernel)[None, :]).ravel()
        if h.shape[-1] != olin.W.shape[-1] or len(cols) != lin.W.shape[-1]:
            done[name] = "Gram matrix does not match the layer"
            continue
        n = max(n, 1)
        w_all = olin.W[0][np.asarray(kout)]                       # [c', D]
        b_all = olin.b[np.asarray(kout)]
        mx = sx[0] / n
        cov = h[0] / n - np.outer(mx, mx)
        cxx = cov[np.ix_(cols, cols)]
        cxy = cov[cols] @ w_all.T                                  # [k, c']
        w0 = lin.W[0]
        damp = ridge * float(np.trace(cxx)) / max(len(cols), 1)
        damp = max(damp, 1e-12 * max(float(np.abs(cxx).max()), 1e-30))
        try:
            w_new = np.linalg.solve(cxx + damp * np.eye(len(cols)), cxy + damp * w0.T).T
        except np.linalg.LinAlgError:
            done[name] = "singular"
            continue
        b_new = (w_all @ mx + b_all) - w_new @ mx[cols]
        lin.rule.write(work, lin, w_new[None], b_new)
        done[name] = "refit"
    return ir.from_graph(work, pruned), done
