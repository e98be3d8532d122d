"""What ``sparsify`` and ``share`` report about the model they wrote: bytes on disk before and after,
compressed bytes (a dense file does not shrink by zeros or repeated values alone), and fidelity to
the original (accuracy too when the data has labels)."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from .. import ir
from ..data import ArrayData
from ..measure import quality
from .sparsity.storage import compressed_size, compression_method


def save_and_measure(model: ir.Model, proto: onnx.ModelProto, output: str | os.PathLike, data: ArrayData,
                     input_shapes: dict[str, list[int]] | None = None) -> dict:
    """Save ``proto`` to ``output`` (never over ``model``'s file); sizes, compressed sizes and fidelity
    of ``proto`` to ``model`` on ``data``, as report keys."""
    after = ir.save(proto, output, source=model.path)
    method = compression_method()
    ev = quality.evaluate(proto, data, model, input_shapes).to_json()
    return {
        "file_bytes_before": model.file_bytes, "file_bytes_after": after,
        "compressed_bytes_before": compressed_size(model.path, method),
        "compressed_bytes_after": compressed_size(Path(output), method),
        "compression": method,
        "data": f"{data.num_samples} samples from {data.source or data.kind}",
        "fidelity": ev["fidelity"], "accuracy": ev["accuracy"], "reference_accuracy": ev["reference_accuracy"],
    }
