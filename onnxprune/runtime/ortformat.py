"""The ORT format (onnxruntime Mobile and minimal builds) through onnxruntime's own converter.

The ``.ort`` file is written beside the ``.onnx`` (``model.onnx`` -> ``model.ort``), loaded back and
run on the same inputs as the ``.onnx``; the converter's list of the operators the model needs (the
input of a minimal onnxruntime build) becomes ``model.required_operators.config`` beside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import OnnxPruneError

STYLE = "Fixed"   # optimisations applied before saving, as onnxruntime advises for CPU deployment


def convert(onnx_path: str | os.PathLike, feed: dict[str, np.ndarray], *, rtol: float = 1e-4,
            atol: float = 1e-5) -> dict:
    """Write ``<stem>.ort`` beside ``onnx_path``, check that it loads and matches; return the report entry."""
    from . import session

    src = Path(onnx_path)
    dst = src.with_suffix(".ort")
    ops = src.with_suffix(".required_operators.config")
    with tempfile.TemporaryDirectory(dir=src.parent, prefix=".ort.") as d:
        proc = subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
                               "--output_dir", str(Path(d) / "out"), "--optimization_style", STYLE],
                              capture_output=True, text=True)
        made = Path(d) / "out" / f"{src.stem}.ort"
        if proc.returncode or not made.exists():
            tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
            raise OnnxPruneError(f"onnxruntime's ORT converter failed on {src}: {tail[:300]}")
        config = next((Path(d) / "out").glob("*.config"), None)
        os.replace(made, dst)   # same folder: atomic
        if config is not None:
            shutil.move(str(config), ops)
    want = session(str(src), role="reference").run(None, feed)
    got = session(str(dst), role="reference").run(None, feed)
    worst = max((float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)) -
                 rtol * float(np.abs(b).max(initial=0.0)) for a, b in zip(got, want)), default=0.0)
    passed = worst <= atol
    if not passed:
        dst.unlink()
        raise OnnxPruneError(f"the ORT format model differs from {src} beyond rtol {rtol}; not kept")
    return {"path": str(dst), "bytes": dst.stat().st_size, "loads": True, "matches_onnx": passed,
            "rtol": rtol, "atol": atol, "optimization_style": STYLE,
            "required_operators": str(ops) if ops.exists() else None,
            "contains": "the graph after onnxruntime's optimisations (style Fixed, baked in for this kind of CPU), "
                        "weights, in FlatBuffers; runs in onnxruntime only, including Mobile and minimal builds "
                        "(which need the operators listed in required_operators)"}


def formats(onnx_path, size: int, proto, ort: bool, input_shapes) -> dict:
    """The report's ``formats`` entry: the .onnx, and with ``ort`` the .ort written and checked."""
    from .. import ir
    from ..data import random_feed

    out = {"onnx": {"path": str(onnx_path), "bytes": size,
                    "contains": "graph and weights as written (ONNX protobuf): portable to any ONNX runtime"}}
    if ort:
        feed = random_feed(proto, ir.resolve_input_shapes(proto, input_shapes))
        out["ort"] = convert(onnx_path, feed)
    return out
