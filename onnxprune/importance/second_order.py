"""Calibration criteria from the Gram matrix ``H = XᵀX`` of each consumer layer's input.

``obs``: structured Optimal Brain Surgeon, applied greedily and sequentially
as OBC (Frantar & Alistarh 2022) and SlimGPT do. Removing a channel's input
columns ``S`` of a consumer layer and optimally re-fitting the remaining
columns costs ``Σ_rows w_Sᵀ ((H⁻¹)_SS)⁻¹ w_S`` — exactly the increase of the
layer's summed squared output error on the calibration data (with damping
``H + λI``). The cheapest channel goes, ``H⁻¹`` is downdated and ``W``
compensated, every cost is recomputed, and so on: a channel's score is the
cumulative error once it and all channels removed before it are gone. So two
channels that can stand in for each other are not both removed because each
looked free while the other stayed. The score assumes the re-fit that
``--reconstruct ls`` performs; without it, pruning leaves the uncompensated error.

``lasso``: channel selection of He et al. (2017): the layer output is the sum
of per-channel contributions ``Z_c = X_c W_cᵀ``; a LASSO over coefficients
``β`` (``min ½‖Y - Σ β_c Z_c‖² + λ‖β‖₁``) is solved exactly for every penalty
by the LASSO homotopy (LARS with drops), from the penalty that zeroes every
coefficient down to 0. ``ZᵀZ`` comes from ``H`` without another data pass:
``(ZᵀZ)_cd = Σ_{i∈c, j∈d} H_ij (WᵀW)_ij``. A channel's score is the area under
its ``|β_c(λ)|`` path: channels that stay in the active set up to large
penalties, with large coefficients, score high.
"""

from __future__ import annotations

import heapq

import numpy as np

from ..groups import Group
from .base import Criterion
from .context import ScoreContext
from .layers import Layer, consumer_layers
from .stats import Needs

def _gram_layers(group: Group, ctx: ScoreContext) -> list[Layer]:
    return [la for la in consumer_layers(group, ctx) if la.gram_spec is not None]


def plan_gram(group: Group, ctx: ScoreContext) -> Needs | None:
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
    """Single-removal OBS error per channel for one (conv group of a) layer: h [D, D], w [out, D], idx [D].

    The first step of :func:`obs_sequence`; kept for diagnostics and tests.
    """
    err = np.zeros(size)
    if (idx >= 0).any():
        for chans, cost in _removal_costs(_Downdated(damped_inverse(h, damp), w), _channel_sets(idx)):
            err[chans] += cost
    return err


MAX_STEPS = 128       # greedy steps per conv group; wider groups remove ceil(n / MAX_STEPS) channels per step
COUPLED = 0.5         # ... but never two whose partial correlation (through H⁻¹) exceeds this in one step
FLUSH = 32            # downdates of H⁻¹ kept as a low-rank factor before one GEMM applies them


class _Downdated:
    """``H⁻¹`` and the compensated ``W`` of one layer under a stream of OBS removals.

    Removing columns ``S`` with ``B = H⁻¹_SS = CCᵀ`` subtracts ``ZZᵀ`` from ``H⁻¹``, where
    ``Z = H⁻¹_{:,S} C⁻ᵀ``. The ``Z`` of the last few removals stay a ``[D, r]`` factor; one GEMM
    applies them every ``FLUSH`` steps, and removed columns are then dropped (memory-bound
    rank-k updates of a D×D matrix would otherwise dominate).
    """

    def __init__(self, hinv: np.ndarray, w: np.ndarray):
        self.base, self.w = hinv, np.array(w, dtype=np.float64)
        self.z = np.zeros((len(hinv), 0))
        self.pos = np.arange(len(hinv))               # original column -> row of base / column of w
        self.dead = np.zeros(len(hinv), dtype=bool)   # over original columns
        self.steps = 0

    def cols(self, cols: np.ndarray) -> np.ndarray:
        """Current ``H⁻¹[:, cols]`` (rows in base order); ``cols`` are original column numbers.

        Gathered as rows (``H⁻¹`` is symmetric): a row is contiguous, a column strided across
        the whole matrix (10x slower to gather at D = 2880)."""
        p = self.pos[cols]
        return (self.base[p] - self.z[p] @ self.z.T).T

    def pair(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Current block ``H⁻¹[a, b]`` for original column numbers ``a``, ``b``."""
        pa, pb = self.pos[a], self.pos[b]
        return self.base[np.ix_(pa, pb)] - self.z[pa] @ self.z[pb].T

    def blocks(self, cols: np.ndarray) -> np.ndarray:
        """Current ``H⁻¹`` blocks ``[n, k, k]`` for channel column sets ``cols`` [n, k]."""
        p = self.pos[cols]
        zc = self.z[p]                                            # [n, k, r]
        return self.base[p[:, :, None], p[:, None, :]] - zc @ zc.transpose(0, 2, 1)

    def wcols(self, cols: np.ndarray) -> np.ndarray:
        return self.w[:, self.pos[cols]]

    def remove(self, cols: np.ndarray) -> float:
        """Remove original columns ``cols``: compensate ``w``, downdate ``H⁻¹``; returns the error added."""
        p = self.pos[cols]
        hcols = self.cols(cols)                                   # [D', s]
        c = _cholesky(hcols[p])
        zs = np.linalg.solve(c, hcols.T)                          # C⁻¹ H⁻¹_{S,:}: [s, D']
        ws = np.linalg.solve(c, self.w[:, p].T).T                 # W_S C⁻ᵀ: [out, s]
        self.w -= ws @ zs
        self.w[:, p] = 0.0
        self.z = np.hstack([self.z, zs.T])
        self.dead[cols] = True
        self.steps += 1
        if self.steps % FLUSH == 0:
            self._flush()
        return float((ws * ws).sum())

    def _flush(self) -> None:
        self.base -= self.z @ self.z.T
        alive = np.nonzero(~self.dead)[0]
        if 4 * len(alive) < 3 * len(self.base):               # drop removed columns: O(D_left²) from now on
            keep = self.pos[alive]
            self.base = np.ascontiguousarray(self.base[np.ix_(keep, keep)])
            self.w = np.ascontiguousarray(self.w[:, keep])
            self.pos = np.full(len(self.pos), -1)
            self.pos[alive] = np.arange(len(alive))
        self.z = np.zeros((len(self.base), 0))


def _cholesky(block: np.ndarray) -> np.ndarray:
    """Cholesky factor of a block of ``H⁻¹`` (positive definite up to rounding: jittered if not)."""
    try:
        return np.linalg.cholesky(block)
    except np.linalg.LinAlgError:
        jitter = 1e-10 * max(float(np.trace(block)) / len(block), 1e-300)
        return np.linalg.cholesky(block + jitter * np.eye(len(block)))


def _removal_costs(state: "_Downdated", sets: list[tuple[np.ndarray, np.ndarray]]):
    """Yield (channels, OBS cost ``Σ_o w_{o,S}ᵀ ((H⁻¹)_SS)⁻¹ w_{o,S}``) for every channel set."""
    for chans, cols in sets:
        ws = state.wcols(cols).transpose(1, 2, 0)                 # [n, k, out]
        gram = ws @ ws.transpose(0, 2, 1)                         # W_Sᵀ W_S: [n, k, k]
        blocks = state.blocks(cols)
        try:
            inv = np.linalg.inv(blocks)
        except np.linalg.LinAlgError:                             # only without damping
            inv = np.linalg.pinv(blocks, hermitian=True)
        yield chans, np.maximum((inv * gram).sum(axis=(1, 2)), 0.0)


def _pick(ranked: np.ndarray, cols: list[np.ndarray], state: "_Downdated", count: int) -> list[int]:
    """The ``count`` first of ``ranked`` (indices into ``cols``), skipping any coupled with one already taken."""
    taken: list[int] = []
    whiten: dict[int, np.ndarray] = {}
    for i in ranked:
        if len(taken) == count:
            break
        ci = cols[i]
        whiten[i] = np.linalg.inv(_cholesky(state.pair(ci, ci)))
        if all(np.linalg.norm(whiten[i] @ state.pair(cols[j], ci).T @ whiten[j].T, 2) <= COUPLED for j in taken):
            taken.append(int(i))
    return taken


def obs_sequence(h: np.ndarray, w: np.ndarray, idx: np.ndarray, damp: float,
                 max_steps: int = MAX_STEPS) -> list[tuple[int, float]]:
    """Greedy sequential OBS removal (OBC, Frantar & Alistarh 2022; SlimGPT) of one conv group's channels.

    Repeatedly removes the channel whose removal, with the remaining columns re-fitted, costs
    least; then downdates ``H⁻¹ ← H⁻¹ − H⁻¹_{:,S}(H⁻¹_SS)⁻¹H⁻¹_{S,:}`` and compensates
    ``W ← W − W_S(H⁻¹_SS)⁻¹H⁻¹_{S,:}``, so every later cost is measured on the already
    compensated layer. Returns ``[(channel, marginal error)]`` in removal order.

    Groups of more than ``max_steps`` channels remove ``ceil(n / max_steps)`` of the cheapest per
    step, never two coupled ones (partial correlation above ``COUPLED``): of two duplicated
    channels one still goes first and the other becomes expensive.
    """
    state = _Downdated(damped_inverse(h, damp), w)
    sets = _channel_sets(idx)
    remaining = sum(len(c) for c, _ in sets)
    per_step = -(-remaining // max(1, max_steps))
    order: list[tuple[int, float]] = []
    while remaining:
        costs = list(_removal_costs(state, sets))
        chans = np.concatenate([c for c, _ in costs])
        cost = np.concatenate([e for _, e in costs])
        ranked = np.argsort(cost, kind="stable")
        if per_step == 1:
            pick = ranked[:1]
        else:
            pick = np.array(_pick(ranked, [cl[j] for c, cl in sets for j in range(len(c))], state, per_step))
        gone = chans[pick]
        joint = state.remove(np.concatenate([cl[np.isin(c, gone)].ravel() for c, cl in sets]))
        # inside one step the joint error is shared in proportion to the single costs
        total = cost[pick].sum()
        share = cost[pick] / total if total > 0 else np.full(len(pick), 1 / len(pick))
        order += [(int(c), float(joint * f)) for c, f in zip(gone, share)]
        sets = [(c[keep], cl[keep]) for c, cl in sets for keep in [~np.isin(c, gone)] if keep.any()]
        remaining -= len(gone)
    return order


def obs_scores(h: np.ndarray, w: np.ndarray, idx: np.ndarray, size: int, damp: float) -> np.ndarray:
    """[size] score per channel of a layer's conv groups (h [G, D, D], w [G, out, D], idx [G, D]).

    A channel's score is the cumulative output error of the greedy removal at the step it goes:
    the layer's summed squared error, with re-fitting, once it and every cheaper channel are
    removed. Conv groups are independent (block-diagonal ``H``), so their sequences are merged
    as one greedy would: always the group whose next removal is cheapest.
    """
    seqs = [obs_sequence(h[g], w[g], idx[g], damp) for g in range(len(h)) if (idx[g] >= 0).any()]
    heap = [(s[0][1], g, 0) for g, s in enumerate(seqs) if s]
    heapq.heapify(heap)
    out, total = np.zeros(size), 0.0
    while heap:
        cost, g, i = heapq.heappop(heap)
        total += cost
        out[seqs[g][i][0]] += total
        if i + 1 < len(seqs[g]):
            heapq.heappush(heap, (seqs[g][i + 1][1], g, i + 1))
    return out


def _obs(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    out = []
    for la in _gram_layers(group, ctx):
        h, w, idx = ctx.gram(la.key, la.gram_spec).gram, la.matrix(), la.column_channels()
        out.append(obs_scores(h, w, idx, group.size, ctx.damp))
    return out


def contribution_gram(h: np.ndarray, w: np.ndarray, idx: np.ndarray, size: int) -> np.ndarray:
    """``ZᵀZ`` [size, size] of the per-channel output contributions, from ``H`` and ``W`` (one conv group)."""
    p = np.zeros((len(idx), size))
    keep = idx >= 0
    p[np.nonzero(keep)[0], idx[keep]] = 1.0
    return p.T @ ((h * (w.T @ w)) @ p)


class _ActiveSet:
    """Active channels with ``G[active]`` and ``(G[active, active])⁻¹`` kept in preallocated buffers.

    Adding a channel updates the inverse through its Schur complement, dropping one through
    the block-inverse identity: O(|A|²) each instead of a fresh O(|A|³) solve.
    """

    def __init__(self, g: np.ndarray, scale: float):
        self.g, self.scale = g, scale
        self.idx: list[int] = []
        self._inv = np.empty((len(g), len(g)))
        self._rows = np.empty((len(g), len(g)))

    @property
    def inv(self) -> np.ndarray:
        return self._inv[:len(self.idx), :len(self.idx)]

    @property
    def rows(self) -> np.ndarray:
        return self._rows[:len(self.idx)]

    def add(self, j: int) -> bool:
        """Add channel ``j``; False when its column is (numerically) spanned by the active ones."""
        n = len(self.idx)
        col = self._rows[:n, j]
        u = self.inv @ col
        s = float(self.g[j, j] - col @ u)
        if s <= 1e-10 * self.scale:
            return False
        self._inv[:n, :n] += np.outer(u, u) / s
        self._inv[:n, n] = self._inv[n, :n] = -u / s
        self._inv[n, n] = 1.0 / s
        self._rows[n] = self.g[j]
        self.idx.append(j)
        return True

    def drop(self, k: int) -> int:
        """Remove the ``k``-th active channel; returns its index."""
        n = len(self.idx)
        inv = self.inv
        keep = np.arange(n) != k
        self._inv[:n - 1, :n - 1] = inv[np.ix_(keep, keep)] - np.outer(inv[keep, k], inv[k, keep]) / inv[k, k]
        self._rows[k:n - 1] = self._rows[k + 1:n]
        return self.idx.pop(k)


def lasso_homotopy(g: np.ndarray, b: np.ndarray | None = None, max_steps: int | None = None):
    """Exact LASSO path of ``min ½βᵀGβ - bᵀβ + λ‖β‖₁`` from ``λ_max`` down to 0 (LARS with drops).

    ``b`` defaults to ``G·1`` (the layer output is the sum of all contributions). Yields
    ``(λ, β)`` at every breakpoint; between breakpoints β is linear in λ. A channel whose
    contribution is (numerically) a combination of the active ones never enters.
    """
    size = len(g)
    b = g.sum(axis=1) if b is None else np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(np.diag(g)).max(initial=0.0)), 1e-300)
    beta = np.zeros(size)
    corr = b.copy()                                   # b - Gβ
    lam = float(np.abs(corr).max(initial=0.0))
    yield lam, beta.copy()
    act = _ActiveSet(g, scale)
    blocked = np.zeros(size, dtype=bool)
    entering = int(np.argmax(np.abs(corr))) if lam > 0 else -1
    for _ in range(max_steps or 8 * size + 8):
        if lam <= 1e-12 * scale:
            break
        if entering >= 0:
            act.add(entering)
            blocked[entering] = True
        if not act.idx:
            break
        d = act.inv @ np.sign(corr[act.idx])          # dβ_A per unit decrease of λ
        a = d @ act.rows                              # d(Gβ) per unit decrease of λ
        gamma, entering, leaving = _next_breakpoint(lam, corr, a, ~blocked, beta[act.idx], d)
        beta[act.idx] += gamma * d
        corr -= gamma * a
        lam -= gamma
        if leaving >= 0:
            j = act.drop(leaving)
            beta[j] = 0.0
            blocked[j] = False
        yield max(lam, 0.0), beta.copy()


def _next_breakpoint(lam, corr, a, free, beta_a, d) -> tuple[float, int, int]:
    """(step in λ, channel entering or -1, active position leaving or -1) of the next path event."""
    gamma, entering, leaving = lam, -1, -1
    with np.errstate(divide="ignore", invalid="ignore"):
        for num, den in ((lam - corr, 1.0 - a), (lam + corr, 1.0 + a)):
            step = np.where(free & (den > 1e-12), num / den, np.inf)
            j = int(np.argmin(step))
            if 0 <= step[j] < gamma:
                gamma, entering = float(step[j]), j
        drop = np.where(d != 0, -beta_a / d, np.inf)
    drop[drop <= 1e-15] = np.inf
    k = int(np.argmin(drop))
    if drop[k] < gamma:
        gamma, entering, leaving = float(drop[k]), -1, k
    return gamma, entering, leaving


def lasso_scores(g: np.ndarray) -> np.ndarray:
    """∫ |β_c(λ)| dλ over the whole path, over λ_max: late leavers with large coefficients score high."""
    area = np.zeros(len(g))
    prev_lam, prev = None, None
    lam_max = 0.0
    for lam, beta in lasso_homotopy(g):
        if prev is None:
            lam_max = lam
        else:
            area += (prev_lam - lam) * (np.abs(prev) + np.abs(beta)) / 2
        prev_lam, prev = lam, beta
    return area / lam_max if lam_max > 0 else area


def _lasso(group: Group, ctx: ScoreContext) -> list[np.ndarray]:
    out = []
    for la in _gram_layers(group, ctx):
        h, w, idx = ctx.gram(la.key, la.gram_spec).gram, la.matrix(), la.column_channels()
        zz = sum(contribution_gram(h[i], w[i], idx[i], group.size) for i in range(len(h)))
        out.append(lasso_scores(zz))
    return out


CRITERIA = [
    Criterion("obs", plan_gram, _obs, requires_data=True, fallback="wanda",
              summary="cumulative OBS error of greedy removal with re-fit (use with --reconstruct ls)"),
    Criterion("lasso", plan_gram, _lasso, requires_data=True, fallback="wanda",
              summary="LASSO channel selection path (He et al. 2017)"),
]
