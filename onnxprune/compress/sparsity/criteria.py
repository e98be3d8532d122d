"""Sparsity criteria (magnitude, Wanda, SparseGPT) and their error measures."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .options import Options
from .masks import quota, lowest, lowest_nm, select


# ---------------------------------------------------------------- criteria

@dataclass
class Stats:
    """Calibration statistics of one site: column sums of squares or the full Gram matrix."""

    full: bool
    count: int = 0
    value: np.ndarray | None = None  # [G, C] or [G, C, C]

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        v = np.einsum("gsc,gsc->gc", x, x) if not self.full else np.matmul(x.transpose(0, 2, 1), x)
        v = v.astype(np.float64)
        self.value = v if self.value is None else self.value + v
        self.count += x.shape[1]


def magnitude(w: np.ndarray, stats: Stats | None, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    mask = select(np.abs(w), opts, per_row=False)
    return np.where(mask, 0.0, w), mask


def wanda(w: np.ndarray, stats: Stats, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    mask = select(np.abs(w) * np.sqrt(stats.value)[:, None, :], opts, per_row=True)
    return np.where(mask, 0.0, w), mask


def _inv_upper(r: np.ndarray) -> np.ndarray:
    """Inverse of an upper-triangular matrix by 2x2 blocks (matrix products only, ~n^3/3 flops)."""
    n = len(r)
    if n <= 256:
        return np.linalg.inv(r)
    k = n // 2
    a, d = _inv_upper(r[:k, :k]), _inv_upper(r[k:, k:])
    out = np.zeros_like(r)
    out[:k, :k], out[k:, k:] = a, d
    out[:k, k:] = -(a @ r[:k, k:]) @ d
    return out


def _inverse_upper(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper-triangular ``U`` with ``U^T U = (H + damp*mean(diag H)*I)^-1``.

    With ``P`` the reversal permutation, ``P H P = L L^T`` gives ``H = R R^T`` for the upper
    ``R = P L P``, so ``H^-1 = (R^-1)^T R^-1`` and ``U = R^-1``: one Cholesky, one triangular inverse.
    """
    h = h.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    eye = np.eye(len(h))
    for attempt in range(6):
        try:
            low = np.linalg.cholesky((h + damp * (10 ** attempt) * mean * eye)[::-1, ::-1])
        except np.linalg.LinAlgError:
            continue
        return _inv_upper(np.ascontiguousarray(low[::-1, ::-1]))
    raise np.linalg.LinAlgError("Hessian not positive definite even with 1e5x damping")


def sparsegpt_group(w: np.ndarray, h: np.ndarray, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    """One ``[rows, cols]`` matrix: blocked OBS pruning with compensation of the kept weights."""
    w = w.astype(np.float64, copy=True)
    r, c = w.shape
    u = _inverse_upper(h, opts.damp)
    pat, s = opts.pattern, opts.target
    bs = opts.blocksize if pat is None else max(pat.m, opts.blocksize // pat.m * pat.m)
    mask = np.zeros_like(w, bool)
    for b0 in range(0, c, bs):
        b1 = min(b0 + bs, c)
        w1, u1 = w[:, b0:b1].copy(), u[b0:b1, b0:b1]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        m1 = lowest(w1 ** 2 / d ** 2, quota(s, r * b1) - quota(s, r * b0)) if pat is None else \
            np.zeros_like(w1, bool)
        for i in range(b1 - b0):
            if pat is not None and i % pat.m == 0:
                m1[:, i:i + pat.m] = lowest_nm(w1[:, i:i + pat.m] ** 2 / d[i:i + pat.m] ** 2, pat)
            col = w1[:, i]
            e = np.where(m1[:, i], col, 0.0) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err[:, i] = e
        w1[m1] = 0.0
        w[:, b0:b1] = w1
        w[:, b1:] -= err @ u[b0:b1, b1:]
        mask[:, b0:b1] = m1
    return w, mask


def sparsegpt(w: np.ndarray, stats: Stats, opts: Options) -> tuple[np.ndarray, np.ndarray]:
    h = stats.value / max(stats.count, 1)
    parts = [sparsegpt_group(w[g], h[g], opts) for g in range(w.shape[0])]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])


# criterion -> (function over [G, R, C] weights, statistics it needs: None, column norms, full Gram)
CRITERION_RULES: dict[str, tuple[Callable, bool | None]] = {
    "magnitude": (magnitude, None),
    "wanda": (wanda, False),
    "sparsegpt": (sparsegpt, True),
}


def relative_error(new: np.ndarray, old: np.ndarray) -> float:
    """``||new - old|| / ||old||`` in float64 (0 for an all-zero ``old``)."""
    old = np.asarray(old, np.float64)
    norm = float(np.linalg.norm(old))
    return float(np.linalg.norm(np.asarray(new, np.float64) - old) / norm) if norm else 0.0


def output_error(w: np.ndarray, new: np.ndarray, stats: Stats | None) -> float | None:
    """``||X dW^T|| / ||X W^T||`` from the Gram matrix (None without one)."""
    if stats is None or not stats.full:
        return None
    d = new - w
    num = float(np.sum(np.matmul(d, stats.value) * d))
    den = float(np.sum(np.matmul(w, stats.value) * w))
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
