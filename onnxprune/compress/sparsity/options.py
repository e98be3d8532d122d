"""Sparsity targets and options: :class:`Pattern` (N:M) and :class:`Options`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ...errors import OnnxPruneError


CRITERIA = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
MIN_SIZE = 128


# ---------------------------------------------------------------- targets

@dataclass(frozen=True)
class Pattern:
    """Semi-structured sparsity: keep ``n`` of every ``m`` consecutive inputs."""

    n: int
    m: int

    @classmethod
    def parse(cls, spec: str) -> "Pattern":
        mt = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec or "")
        if not mt:
            raise OnnxPruneError(f"--pattern '{spec}': expected N:M, e.g. 2:4 (keep N of every M weights)")
        n, m = int(mt.group(1)), int(mt.group(2))
        if not 0 < n < m:
            raise OnnxPruneError(f"--pattern {spec}: need 0 < N < M (N weights kept of every M), e.g. 2:4")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Options:
    """What ``sparsify`` does; validated on construction (bad values raise OnnxPruneError)."""

    sparsity: float | None = None
    pattern: Pattern | None = None
    criterion: str = "magnitude"
    global_scope: bool = False
    ignore: tuple[str, ...] = ()
    min_size: int = MIN_SIZE
    sequential: bool = True
    blocksize: int = 128
    damp: float = 0.01
    calib_samples: int = 128
    batch_size: int = 16

    def __post_init__(self):
        s, p = self.sparsity, self.pattern
        if s is None and p is None:
            raise OnnxPruneError("give --sparsity (e.g. 0.7) or --pattern (e.g. 2:4)")
        if s is not None and (not isinstance(s, (int, float)) or math.isnan(s) or not 0 <= s < 1):
            raise OnnxPruneError(f"--sparsity {s}: must be in [0, 1)")
        if p is not None and s is not None and abs(s - p.sparsity) > 1e-9:
            raise OnnxPruneError(f"--sparsity {s} contradicts --pattern {p} ({p.sparsity:g}); give one of them")
        if self.criterion not in CRITERIA:
            raise OnnxPruneError(f"--criterion {self.criterion}: expected one of {', '.join(CRITERIA)}")
        if self.global_scope and (p is not None or self.criterion != "magnitude"):
            raise OnnxPruneError("--global works with --criterion magnitude and no --pattern only")
        if self.min_size < 0 or self.blocksize < 1 or self.calib_samples < 1 or self.batch_size < 1:
            raise OnnxPruneError("--min-size must be >= 0; block size, calibration samples and batch size >= 1")
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise OnnxPruneError(f"--damp {self.damp}: must be a positive number, e.g. 0.01")

    @property
    def target(self) -> float:
        return self.pattern.sparsity if self.sparsity is None else float(self.sparsity)

    @property
    def calibrated(self) -> bool:
        return self.criterion in CALIBRATED
