"""Calibration criteria from the Gram matrix ``H = XᵀX`` of each consumer layer's input.

``obs``: the Optimal Brain Surgeon cost of removing a channel's input columns
``S`` of a consumer layer and optimally re-fitting the remaining columns,
``Σ_rows w_Sᵀ ((H⁻¹)_SS)⁻¹ w_S`` — exactly the increase of the layer's summed
squared output error on the calibration data (with damping ``H + λI``).

``lasso``: channel selection of He et al. (2017): the layer output is the sum
of per-channel contributions ``Z_c = X_c W_cᵀ``; a LASSO over coefficients
``β`` (``min ½‖Y - Σ β_c Z_c‖² + λ‖β‖₁``) is solved by coordinate descent for
an increasing penalty. ``ZᵀZ`` comes from ``H`` without another data pass:
``(ZᵀZ)_cd = Σ_{i∈c, j∈d} H_ij (WᵀW)_ij``. A channel's score is the area under
its ``|β_c(λ)|`` path: channels that leave the active set late, with large
coefficients, score high.
"""

from __future__ import annotations

import numpy as np

from ..groups import Group
from .base import Criterion
from .context import ScoreContext
from .layers import Layer, consumer_layers
from .stats import Needs

LASSO_STEPS = 40


def _gram_layers(group: Group, ctx: ScoreContext) -> list[Layer]:
    return [la for la in consumer_layers(group, ctx) if la.gram_spec is not None]


def _plan_gram(group: Group, ctx: ScoreContext) -> Needs | None:
    layers = _gram_layers(group, ctx)
    return Needs(grams={la.key: la.gram_spec for la in layers}) if layers else None


def damped_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """``(H + damp·mean(diag H)·I)⁻¹`` (pseudo-inverse if still singular)."""
    d = float(np.mean(np.diag(h))) if h.size else 0.0
    hd = h + (damp * d if d > 0 else damp) * np.eye(len(h))
    try:
        return np.linalg.inv(hd)
    except np.linalg.LinAlgError:
        return np.linalg.pinv(hd, hermitian=True)


def _channel_sets(idx: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Channels with the same number of columns, and their column sets: [(channels [n], cols [n, k])]."""
    keep = np.nonzero(idx >= 0)[0]
    keep = keep[np.argsort(idx[keep], kind="stable")]
    chans, starts, counts = np.unique(idx[keep], return_index=True, return_counts=True)
    out = []
    for k in np.unique(counts):
        sel = counts == k
        cols = keep[starts[sel][:, None] + np.arange(k)[None, :]]
        out.append((chans[sel], cols))
    return out


def obs_errors(h: np.ndarray, w: np.ndarray, idx: np.ndarray, size: int, damp: float) -> np.ndarray:
    """OBS removal error per channel for one (conv group of a) layer: h [D, D], w [out, D], idx [D]."""
    err = np.zeros(size)
    if not (idx >= 0).any():
        return err
    hinv = damped_inverse(h, damp)
    for chans, cols in _channel_sets(idx):
        blocks = hinv[cols[:, :, None], cols[:, None, :]]             # [n, k, k]
        ws = w[:, cols].transpose(1, 2, 0)                            # [n, k, out]
        sol = np.linalg.solve(blocks, ws)
        err[chans] += (ws * sol).sum(axis=(1, 2))
    return err


def _obs(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    out = []
    for la in _gram_layers(group, ctx):
        h, w, idx = ctx.gram(la.key, la.gram_spec).gram, la.matrix(), la.column_channels()
        out.append(sum(obs_errors(h[g], w[g], idx[g], group.size, ctx.damp) for g in range(len(h))))
    return out


def contribution_gram(h: np.ndarray, w: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    """``ZᵀZ`` [size, size] of the per-channel output contributions, from ``H`` and ``W`` (one conv group)."""
    p = np.zeros((len(idx), size))
    keep = idx >= 0
    p[np.nonzero(keep)[0], idx[keep]] = 1.0
    return p.T @ ((h * (w.T @ w)) @ p)


def lasso_path(g: np.ndarray, steps: int = LASSO_STEPS, tol: float = 1e-9, max_sweeps: int = 200) -> np.ndarray:
    """Mean |β_c| over a geometric grid of penalties up to the one that zeroes every β (``b = G·1``)."""
    size = len(g)
    diag = np.diag(g).copy()
    live = diag > 1e-12 * max(float(diag.max(initial=0.0)), 1e-300)
    b = g.sum(axis=1)
    beta = live.astype(np.float64)
    grad = g @ beta - b
    lam_max = float(np.abs(b[live]).max(initial=0.0))
    area = np.zeros(size)
    if lam_max <= 0:
        return area
    for lam in lam_max * np.geomspace(1e-3, 1.0, steps):
        active = list(np.nonzero(beta)[0])
        for _ in range(max_sweeps):
            moved = 0.0
            for c in active:
                z = beta[c] - grad[c] / diag[c]
                new = np.sign(z) * max(abs(z) - lam / diag[c], 0.0)
                if new != beta[c]:
                    grad += g[:, c] * (new - beta[c])
                    moved = max(moved, abs(new - beta[c]))
                    beta[c] = new
            if moved <= tol:
                wake = np.nonzero(live & (beta == 0) & (np.abs(grad) > lam * (1 + 1e-9)))[0]
                if not len(wake):
                    break
                active = sorted(set(active) | set(wake.tolist()))
            else:
                active = [c for c in active if beta[c] != 0]     # zeros come back through the KKT check
        area += np.abs(beta)
    return area / steps


def _lasso(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    out = []
    for la in _gram_layers(group, ctx):
        h, w, idx = ctx.gram(la.key, la.gram_spec).gram, la.matrix(), la.column_channels()
        zz = sum(contribution_gram(h[i], w[i], idx[i], group.size) for i in range(len(h)))
        out.append(lasso_path(zz))
    return out


CRITERIA = [
    Criterion("obs", _plan_gram, _obs, requires_data=True, fallback="wanda",
              summary="OBS output error of removing the channel's input columns"),
    Criterion("lasso", _plan_gram, _lasso, requires_data=True, fallback="wanda",
              summary="LASSO channel selection path (He et al. 2017)"),
]
