"""Regressions found by tools/bench_coverage.py on the model zoo, each reduced to a small graph."""

import numpy as np
from builders import GraphBuilder

from onnxprune import runtime, verify
from onnxprune.data import random_feed


def _projection_block(channels: int):
    """Stem -> projection shortcut (first in node order) + bottleneck branch -> Add -> head."""
    g = GraphBuilder("x", [1, 3, 8, 8])
    x = g.relu(g.conv("x", channels, k=3))
    shortcut = g.conv(x, channels, k=1, pad=0)
    y = g.conv(g.relu(g.conv(x, channels, k=1, pad=0)), channels, k=1, pad=0)
    y = g.relu(g.add(y, shortcut))
    g.output(g.gemm(g.flatten(g.gap(y)), 5))
    return g.build(), shortcut


def test_tap_lost_by_onnxruntime_layout_pass_still_verifies():
    """ResNet-50 at ratio 0.3 has 45 channels (64 -> 45) before its first projection shortcut.
    With that Conv's output exposed as a graph output (a verification tap) and not the Add's,
    onnxruntime 1.32's NCHWc layout pass drops the tensor and the session fails to load; the
    model without taps loads fine, so the verifier must still compare it."""
    m, shortcut = _projection_block(45)
    feeds = [random_feed(m, {"x": [1, 3, 8, 8]}, seed=s) for s in range(2)]
    ver = verify.compare(m, m, feeds, taps={shortcut: (shortcut, 1, np.array([], dtype=np.int64))})
    assert ver.passed, ver.error
    assert [o.name for o in ver.outputs if o.name == shortcut] == [shortcut]
    assert max(o.max_abs for o in ver.outputs) == 0.0


def test_verification_still_fails_when_the_candidate_itself_is_broken():
    """The fallback for lost taps must not hide a candidate that onnxruntime cannot load at all."""
    m, shortcut = _projection_block(45)
    broken = type(m)()
    broken.CopyFrom(m)
    broken.graph.node[2].input[1] = "missing_weight"
    feeds = [random_feed(m, {"x": [1, 3, 8, 8]}, seed=0)]
    ver = verify.compare(broken, m, feeds, taps={shortcut: (shortcut, 1, np.array([], dtype=np.int64))})
    assert not ver.passed and "missing_weight" in ver.error
    assert runtime.session(m) is not None
