"""Mask selection: which entries of a score array are zeroed (per layer, per row, N:M)."""

from __future__ import annotations

import math

import numpy as np

from .options import Options, Pattern


# ---------------------------------------------------------------- mask selection

def quota(s: float, units: int) -> int:
    """How many of ``units`` a fraction ``s`` removes (rounded to nearest)."""
    return int(math.floor(s * units + 0.5))


def lowest(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of exactly the ``k`` lowest scores."""
    flat = scores.reshape(-1)
    mask = np.zeros(flat.shape, bool)
    if k >= flat.size:
        mask[:] = True
    elif k > 0:
        mask[np.argpartition(flat, k - 1)[:k]] = True
    return mask.reshape(scores.shape)


def _lowest_along_last(scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per slice along the last axis, the ``counts[...]`` lowest entries."""
    order = np.argsort(scores, axis=-1)
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, order, np.arange(scores.shape[-1]) < counts[..., None], axis=-1)
    return mask


def lowest_per_row(scores: np.ndarray, s: float) -> np.ndarray:
    """Per row of the last axis, the lowest ``s`` fraction, quotas rounded cumulatively."""
    rows = scores.reshape(-1, scores.shape[-1])
    r, c = rows.shape
    cum = np.array([quota(s, c * i) for i in range(r + 1)])
    return _lowest_along_last(rows, np.diff(cum)).reshape(scores.shape)


def lowest_nm(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """In every block of ``m`` along the last axis, the ``m - n`` lowest."""
    blocks = scores.reshape(*scores.shape[:-1], -1, pattern.m)
    return _lowest_along_last(blocks, np.full(blocks.shape[:-1], pattern.m - pattern.n)).reshape(scores.shape)


def select(scores: np.ndarray, opts: Options, per_row: bool) -> np.ndarray:
    if opts.pattern is not None:
        return lowest_nm(scores, opts.pattern)
    if per_row:
        return lowest_per_row(scores, opts.target)
    return lowest(scores, quota(opts.target, scores.size))
