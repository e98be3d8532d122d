"""Latency-aware allocation: which groups a MACs or latency budget should shrink more.

MACs do not predict CPU latency well in networks built from inverted residual
blocks: a depthwise convolution, an unfused activation or a squeeze-excitation
gate does few MACs but reads and writes a whole expanded tensor, so its time
follows the memory it touches. A uniform ratio then reaches 0.5x MACs while
latency stays far above 0.5x, because the 1x1 convolutions (MACs quadratic in
width) shrink faster than the memory-bound work (linear in width).

The cost model is first order and per channel of a group::

    cost(g) = MACs(g) + ELEMENT_MACS * elements(g)

where ``MACs(g)`` is what removing one channel of ``g`` saves in the layers it
feeds and comes from, and ``elements(g)`` the activation and weight elements it
saves (each streamed once per inference). ``weights()`` returns ``cost / MACs``
per group, relative to the MAC-weighted mean: above 1, a channel of that group
buys more latency than its MACs say. ``ratios(strength, weights)`` turns one
searched strength into per-group ratios ``strength * weight ** gamma`` (capped),
so the budget search keeps its single bisection.
"""

from __future__ import annotations

import numpy as np

from ..groups import ACTIVATION, WEIGHT_IN, WEIGHT_OUT, Analysis, Group
from ..measure.counts import ModelStats

# One float element read or written costs about as much time as this many MACs on a CPU:
# measured per node with onnxruntime's profiler on MobileNetV2 (x86-64, AVX-512, 2 threads):
# a 1x1 convolution sustains ~45 GMAC/s, memory-bound work 2 to 3 G elements/s.
ELEMENT_MACS = 20.0
GAMMA = 2.0          # how strongly weights skew the ratios (0 = uniform; 2 measured best, docs/latency.md)


def _numel(shape) -> int:
    return int(np.prod(shape)) if shape else 0


def group_cost(group: Group, analysis: Analysis, layers: dict) -> tuple[float, float]:
    """(MACs, elements) one average channel of ``group`` saves when removed."""
    share: dict[str, float] = {}
    elements = 0.0
    for m in group.members:
        frac = len(m.covered) / max(len(m.index), 1) / group.size
        if m.kind in (WEIGHT_OUT, WEIGHT_IN) and m.node in layers:
            share[m.node] = max(share.get(m.node, 0.0), frac)
        elif m.kind == ACTIVATION:
            elements += _numel(analysis.shapes.get(m.tensor)) * frac
    macs = sum(layers[n].macs * f for n, f in share.items())
    elements += sum(layers[n].params * f for n, f in share.items())
    return macs, elements


def weights(analysis: Analysis, stats: ModelStats, groups: list[Group],
            element_macs: float = ELEMENT_MACS) -> dict[int, float]:
    """Per group id: latency per MAC relative to the MAC-weighted mean (1 = average)."""
    layers = {layer.name: layer for layer in stats.layers}
    raw, mass = {}, {}
    for g in groups:
        macs, elements = group_cost(g, analysis, layers)
        if macs <= 0:
            continue
        raw[g.id] = (macs + element_macs * elements) / macs
        mass[g.id] = macs * g.size
    if not raw:
        return {}
    mean = sum(raw[k] * mass[k] for k in raw) / max(sum(mass.values()), 1e-12)
    return {k: v / mean for k, v in raw.items()}


def ratios(strength: float, w: dict[int, float], cap: float, gamma: float | None = None) -> dict[int, float]:
    """Per-group ratios for one searched ``strength``: ``strength * w ** gamma``, at most ``cap``."""
    gamma = GAMMA if gamma is None else gamma
    return {gid: float(min(cap, max(0.0, strength * wi ** gamma))) for gid, wi in w.items()}


def top_strength(w: dict[int, float], cap: float, gamma: float | None = None) -> float:
    """The strength at which every group reaches ``cap``."""
    gamma = GAMMA if gamma is None else gamma
    low = min((wi ** gamma for wi in w.values()), default=1.0)
    return cap / max(low, 1e-6) * (1 + 1e-9)   # past rounding, so every group is at the cap
