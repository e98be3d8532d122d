"""What reconstruction did, per layer and in total, as data (``to_json``) for the CLI and the docs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

KEPT, REJECTED, SKIPPED = "kept", "rejected", "skipped"


@dataclass
class LayerResult:
    """One refit: held-out errors are MSE to the original layer's output over its mean square."""

    node: str
    op: str
    kind: str                       # "ls", "bias" or "bn"
    kept_in: int = 0                # input channels the pruned layer keeps (BN: channels)
    total_in: int = 0               # input channels of the original layer
    error_before: float | None = None
    error_after: float | None = None
    status: str = SKIPPED           # "kept", "rejected" or "skipped"
    reason: str = ""
    stage: int = -1                 # which pass over the data fitted it
    source: str = "pruned"          # whose activations fed the fit: the pruned model's or the original's

    def row(self) -> list:
        err = lambda e: "-" if e is None else f"{e:.4g}"  # noqa: E731
        return [self.node, self.op, self.kind, f"{self.kept_in}/{self.total_in}", err(self.error_before),
                err(self.error_after), self.status + (f" ({self.reason})" if self.reason else "")]


@dataclass
class ReconstructReport:
    mode: str
    ridge: float = 0.0
    holdout: float = 0.0
    fit_samples: int = 0
    holdout_samples: int = 0
    levels: int = 0                 # dependency levels among the refit layers
    stages: int = 0                 # groups of levels: one pass of the pruned model each, at most
    passes: int = 0                 # passes over the data actually made (both models)
    cached_mb: float = 0.0          # sampled targets kept between the original's pass and the pruned's
    positions: int | None = None    # output positions sampled per sample and layer (None: all)
    seconds: float = 0.0
    timing: dict = field(default_factory=dict)      # seconds per phase: passes, solve, fidelity
    layers: list[LayerResult] = field(default_factory=list)
    fidelity: dict = field(default_factory=dict)    # {"pruned": {...}, "reconstructed": {...}} on held-out data
    fidelity_samples: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for r in self.layers if r.status == status)

    @property
    def totals(self) -> dict:
        return {s: self.count(s) for s in (KEPT, REJECTED, SKIPPED)}

    def to_json(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals
        return d

    COLUMNS = ("node", "op", "kind", "kept in", "err before", "err after", "status")
