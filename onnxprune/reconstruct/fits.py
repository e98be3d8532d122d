"""The three refits: least squares, bias compensation, BatchNormalization statistics.

Each refit streams the tensors it asks for into running sums, never keeping
activations: ``add_original`` takes a batch's tensors from the original model and
``add_pruned`` the same batch's tensors from the pruned model being rebuilt. The two
may come from different passes over the data: a refit that needs both keeps, in
between, only the sampled target rows of each batch (a queue read back in order).
``solve`` computes the new parameters and their held-out error from the sums alone
and keeps them only if that error is lower than the layer's error as it stands;
``apply`` writes kept parameters into the working graph.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx_graphsurgeon as gs

from .layers import Linear, const_input, set_vector
from .report import KEPT, REJECTED, SKIPPED, LayerResult


def sample_rows(n: int, per_sample: int, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Flat row indices: all positions, or ``cap`` random positions of each sample."""
    if cap is None or per_sample <= cap:
        return np.arange(n * per_sample)
    pick = np.sort(rng.random((n, per_sample)).argpartition(cap, axis=1)[:, :cap], axis=1)
    return (pick + per_sample * np.arange(n)[:, None]).ravel()


def _decide(result: LayerResult, before: float, after: float) -> bool:
    """Keep a refit only if it lowers the held-out error by more than rounding noise."""
    result.error_before, result.error_after = float(before), float(after)
    keep = bool(np.isfinite(after) and after < before * (1 - 1e-6) - 1e-12)
    result.status = KEPT if keep else REJECTED
    return keep


class Gram:
    """Running sums of G grouped regressions: XᵀX, Σx, XᵀY, Σy, Σy² and the row count (float64).

    Rows are buffered up to ``chunk`` so that small batches still make large matrix products.
    Sums are of rows minus a fixed shift (the first chunk's means), which keeps the
    covariance free of cancellation; each chunk's products are computed in float32 when
    ``K >= FLOAT32_FROM`` (twice the BLAS speed; a chunk's rounding error, ~1e-6 relative,
    is far below the ridge) and added to float64 sums.
    """

    FLOAT32_FROM = 256

    def __init__(self, g: int, k: int, c: int, chunk: int = 2048):
        self._n = 0
        self.xx, self.sx = np.zeros((g, k, k)), np.zeros((g, k))
        self.xy, self.sy, self.yy = np.zeros((g, k, c)), np.zeros((g, c)), np.zeros(g)
        self.shift: tuple[np.ndarray, np.ndarray] | None = None
        self.dtype = np.float32 if k >= self.FLOAT32_FROM else np.float64
        self.chunk = chunk
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0

    @property
    def n(self) -> int:
        self.flush()
        return self._n

    def add(self, X: np.ndarray, Y: np.ndarray) -> None:
        """Rows ``X`` [G, R, K] and targets ``Y`` [G, R, C]."""
        self.pending.append((X, Y))
        self.pending_rows += X.shape[1]
        if self.pending_rows >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        X = np.concatenate([p[0] for p in self.pending], axis=1)
        Y = np.concatenate([p[1] for p in self.pending], axis=1)
        self.pending, self.pending_rows = [], 0
        if self.shift is None:
            self.shift = (X.mean(1, dtype=np.float64), Y.mean(1, dtype=np.float64))
        X = X.astype(self.dtype, copy=False) - self.shift[0][:, None].astype(self.dtype)
        Y = Y.astype(self.dtype, copy=False) - self.shift[1][:, None].astype(self.dtype)
        Xt = X.transpose(0, 2, 1)
        self.xx += Xt @ X
        self.sx += X.sum(1, dtype=np.float64)
        self.xy += Xt @ Y
        self.sy += Y.sum(1, dtype=np.float64)
        self.yy += np.einsum("grc,grc->g", Y, Y, dtype=np.float64)
        self._n += X.shape[1]

    def solve(self, W0: np.ndarray, b0: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
        """Least squares with intercept, damped towards ``W0`` by ``ridge * mean(diag(cov(X)))``.

        Damping towards the current weights (not towards zero) means a huge ridge returns the
        layer unchanged, and the fit's error on its own data is never above ``W0``'s.
        """
        n = max(self.n, 1)
        mx, my = self.sx / n, self.sy / n
        cxx = self.xx / n - mx[:, :, None] * mx[:, None, :]
        cxy = self.xy / n - mx[:, :, None] * my[:, None, :]
        damp = ridge * np.einsum("gkk->g", cxx) / cxx.shape[-1]
        damp = np.maximum(damp, 1e-12 * np.maximum(np.abs(cxx).max(axis=(1, 2)), 1e-30))[:, None, None]
        A = cxx + damp * np.eye(cxx.shape[-1])
        B = cxy + damp * W0.transpose(0, 2, 1)
        try:
            W = np.linalg.solve(A, B)
        except np.linalg.LinAlgError:
            W = np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(A, B)])
        W = W.transpose(0, 2, 1)
        if self.shift is not None:
            mx, my = mx + self.shift[0], my + self.shift[1]
        return W, my - np.einsum("gck,gk->gc", W, mx)

    def error(self, W: np.ndarray, b: np.ndarray) -> float:
        """Σ‖y - Wx - b‖² / Σ‖y‖² over the accumulated rows, from the sums alone."""
        n = self.n
        if self.shift is not None:      # y - Wx - b = y' - Wx' - (b + W·shift_x - shift_y)
            b = b + np.einsum("gck,gk->gc", W, self.shift[0]) - self.shift[1]
        sse = (self.yy - 2 * np.einsum("gck,gkc->g", W, self.xy) - 2 * np.einsum("gc,gc->g", b, self.sy)
               + np.einsum("gck,gck->g", W @ self.xx, W) + 2 * np.einsum("gc,gck,gk->g", b, W, self.sx)
               + n * np.einsum("gc,gc->g", b, b))
        return max(float(sse.sum()), 0.0) / max(self._norm(), 1e-30)

    def _norm(self) -> float:
        """Σ‖y‖² (unshifted) over the accumulated rows."""
        if self.shift is None:
            return float(self.yy.sum())
        s = self.shift[1]
        return float((self.yy + 2 * np.einsum("gc,gc->g", s, self.sy) + self._n * np.einsum("gc,gc->g", s, s)).sum())


class Fit:
    """What every refit offers the scheduler.

    The scheduler calls ``add_original`` with each batch's tensors from the original model
    and, if the refit also needs tensors of the pruned model (``pruned`` is not empty),
    ``add_pruned`` with the same batches in the same order, possibly in a later pass: what
    ``add_original`` keeps for ``add_pruned`` waits in ``queue``. A ``live`` refit gets both
    in one pass (its queue never holds more than one batch).
    """

    kind = ""
    original: list[str]     # tensors it needs from the original model
    pruned: list[str]       # tensors it needs from the pruned model being rebuilt
    result: LayerResult
    live = False            # True: fed both models in the same pass

    def __init__(self) -> None:
        self.queue: deque = deque()

    def add_original(self, tensors: dict[str, np.ndarray], held: bool) -> None:
        raise NotImplementedError

    def add_pruned(self, tensors: dict[str, np.ndarray], held: bool) -> None:
        """Only called when ``pruned`` is not empty."""

    def go_live(self) -> None:
        """Take both models' tensors in the same pass; drop what was queued so far."""
        self.live = True
        self.queue.clear()

    def queued_bytes(self) -> int:
        return sum(a.nbytes for entry in self.queue for a in entry if isinstance(a, np.ndarray))

    def _pop(self, held: bool) -> tuple:
        entry = self.queue.popleft()
        assert entry[0] == held, "add_pruned must see the batches add_original saw, in the same order"
        return entry[1:]

    def solve(self) -> LayerResult:
        raise NotImplementedError

    def apply(self, graph: gs.Graph) -> None:
        raise NotImplementedError

    def from_original(self) -> None:
        """Take the layer's input from the original model (a refit upstream shares this pass)."""


class LeastSquares(Fit):
    """Refit W, b so the layer fed the pruned model's input reproduces the original layer's output."""

    kind = "ls"

    def __init__(self, lin: Linear, kept_in: np.ndarray, kept_out: np.ndarray, result: LayerResult, *,
                 ridge: float, positions: int | None, seed: int):
        super().__init__()
        self.lin, self.kept_out, self.result = lin, kept_out, result
        self.channels_in = kept_in
        self.ridge, self.positions = ridge, positions
        self.rng = np.random.default_rng(seed)
        self.original, self.pruned = [lin.node.outputs[0].name], [lin.node.inputs[0].name]
        self.kept_in: np.ndarray | None = None
        g, c, k = lin.W.shape
        self.grams = {False: Gram(g, k, c), True: Gram(g, k, c)}
        self.new: tuple[np.ndarray, np.ndarray] | None = None

    def from_original(self) -> None:
        """Fit on the original model's input restricted to the kept channels (ThiNet-style):
        consistent with upstream refits that aim at the original, when they cannot run first."""
        self.kept_in = self.channels_in
        self.result.source = "original"
        self.original = self.original + self.pruned
        self.pruned = []

    def add_original(self, original, held):
        rule = self.lin.rule
        y = np.take(original[self.original[0]], self.kept_out, axis=rule.channel_axis)
        rows = sample_rows(y.shape[0], rule.positions(y), self.positions, self.rng)
        g, c = self.lin.W.shape[:2]
        Y = rule.targets(y, rows).reshape(len(rows), g, c).transpose(1, 0, 2)
        if self.kept_in is None:
            self.queue.append((held, rows, Y))
            return
        x = np.take(original[self.original[1]], self.kept_in, axis=rule.channel_axis)
        self.grams[held].add(rule.features(self.lin, x, rows), Y)

    def add_pruned(self, pruned, held):
        rows, Y = self._pop(held)
        self.grams[held].add(self.lin.rule.features(self.lin, pruned[self.pruned[0]], rows), Y)

    def solve(self):
        fit, check = self.grams[False], self.grams[True]
        W0, b0 = self.lin.W, self.lin.b.reshape(self.lin.W.shape[:2])
        W, b = fit.solve(W0, b0, self.ridge)
        if _decide(self.result, check.error(W0, b0), check.error(W, b)):
            self.new = (W, b.reshape(-1))
        return self.result

    def apply(self, graph):
        if self.new is not None:
            self.lin.rule.write(graph, self.lin, *self.new)


class BiasShift(Fit):
    """FLAP-style compensation: add the removed inputs' mean contribution to the bias.

    ``b' = b + Σ_removed W[:, c] · E[x_c]`` with kernel-summed weights and the mean of
    the ORIGINAL model's input channel (ConvTranspose scales by input/output positions).
    """

    kind = "bias"
    live = True     # its held-out check compares whole output maps: too large to queue

    def __init__(self, lin: Linear, original: Linear, kept_in: np.ndarray, kept_out: np.ndarray,
                 result: LayerResult):
        super().__init__()
        self.lin, self.kept_out, self.result = lin, kept_out, result
        self.removed = np.setdiff1d(np.arange(original.cin), kept_in)
        self.weights = original.dense()[:, self.removed][kept_out]        # [Cout', removed]
        node = lin.node
        self.original = [node.inputs[0].name, node.outputs[0].name]
        self.pruned = [node.outputs[0].name]
        self.sum_x = np.zeros(original.cin)
        self.count_x = 0
        self.spread = 1.0
        c = lin.cout
        self.r1, self.r2, self.yy, self.count_y = np.zeros(c), np.zeros(c), 0.0, 0
        self.new: np.ndarray | None = None

    def add_original(self, original, held):
        ax = self.lin.rule.channel_axis
        x, y = original[self.original[0]], original[self.original[1]]
        if not held:
            xs = np.moveaxis(x, ax, -1).reshape(-1, x.shape[ax]).astype(np.float64)
            self.sum_x += xs.sum(0)
            self.count_x += xs.shape[0]
            self.spread = self.lin.rule.spread(x, y)
        self.queue.append((held, np.take(y, self.kept_out, axis=ax) if held else None))

    def add_pruned(self, pruned, held):
        (yo,) = self._pop(held)
        if not held:
            return
        ax = self.lin.rule.channel_axis
        yo = np.moveaxis(yo, ax, -1).astype(np.float64)
        r = (yo - np.moveaxis(pruned[self.pruned[0]], ax, -1)).reshape(-1, len(self.kept_out))
        self.r1 += r.sum(0)
        self.r2 += (r * r).sum(0)
        self.yy += float((yo * yo).sum())
        self.count_y += r.shape[0]

    def solve(self):
        delta = self.spread * self.weights @ (self.sum_x[self.removed] / max(self.count_x, 1))
        before = self.r2.sum()
        after = (self.r2 - 2 * delta * self.r1 + self.count_y * delta * delta).sum()
        if _decide(self.result, before / max(self.yy, 1e-30), max(after, 0.0) / max(self.yy, 1e-30)):
            self.new = self.lin.b + delta
        return self.result

    def apply(self, graph):
        if self.new is not None:
            self.lin.rule.write(graph, self.lin, self.lin.W, self.new)


class BatchNormStats(Fit):
    """Re-estimate a BatchNormalization's mean and variance on the pruned model's activations.

    Moment matching against the original on the same data: ``mean' = μp - (μo - mean)·σp/σo``
    and ``var' = var·σp²/σo²``, so that the pruned BN's output has the first two moments of the
    original's. When the calibration data has the training statistics (μo = mean, σo² = var)
    this is plain re-estimation (mean' = μp, var' = σp²); a BN whose input did not change is
    left exactly as it was.
    """

    kind = "bn"

    def __init__(self, node: gs.Node, original: gs.Node, kept: np.ndarray, result: LayerResult, *,
                 positions: int | None, seed: int):
        super().__init__()
        self.node, self.kept, self.result = node, kept, result
        self.positions, self.rng = positions, np.random.default_rng(seed)
        self.eps = float(node.attrs.get("epsilon", 1e-5))
        self.params = [const_input(node, i).values.astype(np.float64) for i in range(1, 5)]
        self.reference = [const_input(original, i).values.astype(np.float64)[kept] for i in range(1, 5)]
        self.original = self.pruned = [node.inputs[0].name]
        c = len(kept)
        self.sums = {h: np.zeros((6, c)) for h in (False, True)}     # n, Σp, Σp², Σo, Σo², Σpo
        self.new: tuple[np.ndarray, np.ndarray] | None = None
        self.stale = False

    def from_original(self) -> None:
        """Statistics need the rebuilt model's input: with upstream refits in the same pass, skip.

        (Matching moments of an input that upstream refits are about to change corrects the
        same error twice; on PP-LCNet that took top-1 agreement from 100% to chance.)
        """
        self.stale = True
        self.original = self.pruned = []

    def add_original(self, original, held):
        xo = original[self.original[0]]
        n, per_sample = xo.shape[0], int(np.prod(xo.shape[2:]))
        s, p = np.divmod(sample_rows(n, per_sample, self.positions, self.rng), per_sample)
        self.queue.append((held, s, p, xo.reshape(n, xo.shape[1], -1)[s, :, p][:, self.kept]))

    def add_pruned(self, pruned, held):
        s, p, xo = self._pop(held)
        xp = pruned[self.pruned[0]]
        xp = xp.reshape(xp.shape[0], xp.shape[1], -1)[s, :, p].astype(np.float64)
        xo = xo.astype(np.float64)
        sums = self.sums[held]
        sums[0] += xp.shape[0]
        sums[1:] += np.stack([xp.sum(0), (xp * xp).sum(0), xo.sum(0), (xo * xo).sum(0), (xp * xo).sum(0)])

    def _affine(self, mean, var, params):
        scale, shift = params[0], params[1]
        a = scale / np.sqrt(var + self.eps)
        return a, shift - a * mean

    def _error(self, mean, var) -> float:
        n, sp, spp, so, soo, spo = self.sums[True] / np.maximum(self.sums[True][0], 1)
        a, c = self._affine(mean, var, self.params)
        ao, co = self._affine(self.reference[2], self.reference[3], self.reference)
        dc = c - co
        err = a * a * spp + ao * ao * soo - 2 * a * ao * spo + 2 * dc * (a * sp - ao * so) + dc * dc
        ref = ao * ao * soo + 2 * ao * co * so + co * co
        return max(float(err.sum()), 0.0) / max(float(ref.sum()), 1e-30)

    def solve(self):
        if self.stale:
            self.result.reason = "an upstream refit shares its pass (use more stages)"
            return self.result
        n, sp, spp, so, soo, _ = self.sums[False]
        n = max(n[0], 1)
        mp, mo = sp / n, so / n
        vp, vo = np.maximum(spp / n - mp * mp, 0), np.maximum(soo / n - mo * mo, 0)
        mean, var = self.params[2], self.params[3]
        ok = vo > 1e-12 * max(float(vo.max()), 1e-30)
        ratio = np.sqrt(np.where(ok, vp, 1) / np.where(ok, vo, 1))
        new_mean = np.where(ok, mp - (mo - mean) * ratio, mean)
        new_var = np.where(ok, var * ratio * ratio, var)
        if _decide(self.result, self._error(mean, var), self._error(new_mean, new_var)):
            self.new = (new_mean, new_var)
        return self.result

    def apply(self, graph):
        if self.new is not None:
            dtype = const_input(self.node, 3).values.dtype
            set_vector(graph, self.node, 3, self.new[0].astype(dtype), "mean")
            set_vector(graph, self.node, 4, self.new[1].astype(dtype), "var")


def skipped(node: str, op: str, kind: str, reason: str) -> LayerResult:
    return LayerResult(node, op, kind, status=SKIPPED, reason=reason)
