"""The runner interface every module runs models through, whatever the runtime behind it.

    runner = runtime.session(proto)                    # the current target's runtime
    runner.inputs[0].name, runner.outputs[0].shape     # metadata
    logits, = runner.run(["logits"], {"x": x})         # None: every output
    ms = runner.timed_run(feed)                        # one timed run, milliseconds

``run`` takes the output names first and the feed second and returns a list, so a call
reads like the onnxruntime call it replaces; :func:`onnxprune.runtime.run` returns a dict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Port:
    """One model input or output: its name, its shape (ints, or strings/None where symbolic)
    and its element type as a numpy dtype (None where the runtime does not say)."""

    name: str
    shape: tuple
    dtype: np.dtype | None


class Runner:
    """A loaded model ready to run. Subclasses fill in the attributes and ``run``."""

    runtime: str = ""       # "onnxruntime", "openvino"
    device: str = ""        # the execution provider or device that runs it first, e.g. CPUExecutionProvider
    inputs: list[Port]
    outputs: list[Port]
    threads: int = 0        # intra-op threads it runs with (0: the runtime did not say)

    def run(self, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def timed_run(self, feed: Mapping[str, np.ndarray]) -> float:
        """Milliseconds of wall time for one run of every output."""
        t0 = time.perf_counter()
        self.run(None, feed)
        return (time.perf_counter() - t0) * 1e3

    def describe(self) -> str:
        return f"{self.runtime} {self.device}"
