"""Where the time and memory of a run went: wall time per stage and the process's peak memory."""

from __future__ import annotations

import time
from contextlib import contextmanager


@contextmanager
def stage_time(seconds: dict, key: str, peaks: dict | None = None):
    """Add the block's wall time to ``seconds[key]``; with ``peaks``, also record the process's peak
    resident memory so far (MB) at the end of the block, so a report shows which stage raised it."""
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[key] = round(seconds.get(key, 0.0) + time.perf_counter() - t, 4)
        if peaks is not None:
            peaks[key] = peak_rss_mb()


def peak_rss_mb() -> int:
    """Peak resident memory of this process so far, MB (VmHWM; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as fh:
            return next((int(line.split()[1]) // 1024 for line in fh if line.startswith("VmHWM")), 0)
    except OSError:
        return 0
