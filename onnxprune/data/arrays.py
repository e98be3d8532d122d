"""What every data reader gives: :class:`ArrayData`, arrays keyed by model input name, and the
:class:`DataSource` protocol (``batches(batch_size)`` yields feed dicts) that consumers rely on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np


class DataSource(Protocol):
    """What every data reader offers."""

    kind: str  # "npz", "images", "random"
    num_samples: int
    labels: np.ndarray | None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        ...


@dataclass
class ArrayData:
    """Arrays keyed by model input name (from an .npz, an image folder, or made up).

    An array may be lazy (``images.ImageFolder``): slicing it is free and ``np.asarray`` decodes, so
    ``batches`` materialises one batch at a time and ``split`` never reads the data.
    """

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    kind: str = "npz"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield {k: np.asarray(v[start:stop]) for k, v in self.arrays.items()}

    def label_batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray | None]:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        for start in range(0, n, batch_size):
            yield None if self.labels is None else self.labels[start:min(start + batch_size, n)]

    def split(self, first: int) -> tuple["ArrayData", "ArrayData"]:
        """The first ``first`` samples and the rest (e.g. fit and held-out calibration batches)."""
        a = {k: v[:first] for k, v in self.arrays.items()}
        b = {k: v[first:] for k, v in self.arrays.items()}
        la = None if self.labels is None else self.labels[:first]
        lb = None if self.labels is None else self.labels[first:]
        return (ArrayData(a, la, self.kind, self.source, self.meta),
                ArrayData(b, lb, self.kind, self.source, self.meta))
