"""What a criterion sees besides its group: the model, its constants, and lazily computed statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from .. import ir
from ..data import DataSource
from ..errors import OnnxPruneError
from ..groups import Analysis
from . import stats as _stats


CACHE_VALUE_BYTES = 2**24   # constants up to 16 MiB are decoded once per scoring run
CACHE_TOTAL_BYTES = 2**28   # and at most 256 MiB of them are kept


@dataclass
class ScoreContext:
    """Inputs shared by every criterion call of one scoring run.

    ``data`` is the calibration data (``None``: only weight criteria work). Statistics
    are computed on the first :meth:`stats` call for everything registered with
    :meth:`require` so far — ``score_groups`` registers all groups first, so the data
    is streamed once.
    """

    proto: onnx.ModelProto
    analysis: Analysis
    data: DataSource | None = None
    batch_size: int = 32
    progress: Callable | None = None
    limit: int | None = None          # at most this many calibration samples
    seed: int = 0                     # for ``random``
    damp: float = 0.01                # OBS / LASSO: H + damp * mean(diag H) * I
    bins: int = _stats.DEFAULT_BINS   # entropy histogram bins
    gram_rows: int | None = _stats.GRAM_ROWS   # OBS / LASSO: rows (patches, tokens) per sample, None: all
    reduction: str = "mean"           # how member scores combine when a criterion is called directly
    fallbacks: dict[int, str] = field(default_factory=dict)   # group id -> criterion used instead (report)
    _values: dict = field(default_factory=dict, init=False, repr=False)
    _cached_bytes: int = field(default=0, init=False, repr=False)
    _sources: dict | None = field(default=None, init=False, repr=False)
    _nodes: dict | None = field(default=None, init=False, repr=False)
    _needs: _stats.Needs = field(default_factory=_stats.Needs, init=False, repr=False)
    _stats: _stats.CalibrationStats | None = field(default=None, init=False, repr=False)
    cache: dict = field(default_factory=dict, init=False, repr=False)   # per-criterion memo (e.g. layers)

    # ------------------------------------------------------------ constants and nodes
    def _index(self) -> None:
        if self._sources is not None:
            return
        g = self.proto.graph
        self._sources = {t.name: t for t in g.initializer}
        self._nodes = {}
        for n in g.node:
            if n.name:
                self._nodes.setdefault(n.name, n)
            if n.op_type == "Constant" and len(n.output) == 1:
                self._sources.setdefault(n.output[0], n)
            elif n.op_type == "Identity" and n.input and n.input[0] in self._sources:
                self._sources.setdefault(n.output[0], self._sources[n.input[0]])  # exporters dedup constants so

    def is_constant(self, name: str) -> bool:
        self._index()
        return name in self._sources

    def value(self, name: str) -> np.ndarray:
        """A constant tensor (initializer or ``Constant`` node output) as a read-only array.

        Values up to ``CACHE_VALUE_BYTES`` are cached (up to ``CACHE_TOTAL_BYTES`` in all); larger
        ones are decoded on each call, so scoring a large model never holds a second copy of its weights.
        """
        if name in self._values:
            return self._values[name]
        self._index()
        src = self._sources.get(name)
        if src is None:
            raise KeyError(f"'{name}' is not a constant of the model")
        if isinstance(src, onnx.TensorProto):
            v = ir.tensor_to_array(src)
        else:
            v = ir.constant_value(src)
            if v is None:
                raise KeyError(f"Constant node '{src.name}' has no tensor value")
        v.flags.writeable = False
        if v.nbytes <= CACHE_VALUE_BYTES and self._cached_bytes + v.nbytes <= CACHE_TOTAL_BYTES:
            self._values[name] = v
            self._cached_bytes += v.nbytes
        return v

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a constant tensor, without decoding it."""
        self._index()
        src = self._sources.get(name)
        if isinstance(src, onnx.TensorProto):
            return tuple(src.dims)
        return np.shape(self.value(name))

    def node(self, name: str, tensor: str = "", input_index: int = -1) -> onnx.NodeProto | None:
        """The node called ``name``; for unnamed nodes, the one using ``tensor`` as input ``input_index``."""
        self._index()
        if name and name in self._nodes:
            return self._nodes[name]
        if tensor:
            for n in self.proto.graph.node:
                if (input_index >= 0 and input_index < len(n.input) and n.input[input_index] == tensor) or (
                        input_index < 0 and tensor in n.input):
                    return n
        return None

    # ------------------------------------------------------------ statistics
    def require(self, needs: _stats.Needs) -> None:
        """Register statistics to gather on the next :meth:`stats` call."""
        self._needs.merge(needs)

    def pending(self) -> bool:
        """Whether statistics were required that the next :meth:`stats` call would have to gather."""
        return bool(self._needs.missing(self._stats))

    def stats(self) -> _stats.CalibrationStats:
        """Calibration statistics for everything required so far (one pass over the data)."""
        if self.data is None:
            raise OnnxPruneError("this importance criterion needs calibration data; pass --calib DATA.npz "
                                 "(or --calib random), or use a weight criterion such as l2")
        missing = self._needs.missing(self._stats)
        if self._stats is None or missing:
            got = _stats.collect(self.proto, missing, self.data, batch_size=self.batch_size, limit=self.limit,
                                 bins=self.bins, gram_rows_per_sample=self.gram_rows, seed=self.seed,
                                 progress=self.progress)
            self._stats = got if self._stats is None else self._stats.merge(got)
        return self._stats

    def tensor_stats(self, name: str, axis: int, hist: bool = False) -> _stats.TensorStats:
        """Statistics of one tensor along its channel axis (gathered now if not yet registered)."""
        key = (name, axis)
        self.require(_stats.Needs(moments={key}, hist={key} if hist else set()))
        return self.stats().tensors[key]

    def gram(self, key: str, spec: _stats.GramSpec) -> _stats.GramStats:
        """The Gram matrix of a consumer layer's input rows (gathered now if not yet registered)."""
        self.require(_stats.Needs(grams={key: spec}))
        return self.stats().grams[key]


