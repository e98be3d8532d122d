"""Property: every random graph prunes to a valid model that matches its masked original."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz  # noqa: E402  (tools/fuzz.py)

N = int(os.environ.get("ONNXPRUNE_FUZZ_N", "100"))


def test_random_graphs_prune_and_verify(tmp_path):
    failures = []
    for seed in range(100_000, 100_000 + N):   # a range the long runs in docs/ do not use
        status, msg, _ = fuzz.run_one(seed, str(tmp_path))
        if status != "ok":
            failures.append((seed, status, msg))
    assert not failures, failures[:5]


def test_regressions_found_by_fuzzing(tmp_path):
    # seeds that once crashed or failed verification (see docs/reliability.md)
    for seed in (7, 11, 23, 34, 55):
        status, msg, _ = fuzz.run_one(seed, str(tmp_path))
        assert status == "ok", (seed, msg)
