"""onnxruntime's quantizer behind the seam: static QDQ INT8 fed by any iterator of feed dicts, and
dynamic INT8 for MatMul-heavy models. :mod:`onnxprune.compress.quantize` decides and measures."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Iterable, Iterator

import numpy as np
import onnx

from ..errors import OnnxPruneError


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an iterator of feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._it: Iterator = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def __iter__(self):
        return self

    def __next__(self):
        item = self.get_next()
        if item is None:
            raise StopIteration
        return item


def _prepared(proto: onnx.ModelProto, folder: str) -> tuple[str, str]:
    """(path of the model to quantize, what preparation it had): onnxruntime's pre-processing
    (shape inference and graph optimisation, as its quantizer recommends) when it succeeds."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = os.path.join(folder, "float.onnx")
    onnx.save(proto, src)
    prep = os.path.join(folder, "prepared.onnx")
    why = ""
    for symbolic in (True, False):  # symbolic shape inference needs sympy, which onnxprune does not
        try:
            quant_pre_process(src, prep, skip_symbolic_shape=not symbolic)
            return prep, "pre-processed (" + ("symbolic " if symbolic else "") + "shape inference, graph optimisation)"
        except Exception as e:
            why = why or (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return src, f"not pre-processed ({why})"


def quantize(proto: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]] | None, *, dynamic: bool = False,
             per_channel: bool = True, providers: list[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The INT8 model and what was done: static QDQ with activation ranges from ``feeds`` (MinMax), or
    ``dynamic`` (weights INT8, activations quantized per run: no data)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice goes to the root logger; our report says what ran
    try:
        return _quantize(proto, feeds, dynamic, per_channel, providers)
    finally:
        root.setLevel(level)


def _quantize(proto, feeds, dynamic, per_channel, providers):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as d:
        src, prep = _prepared(proto, d)
        out = os.path.join(d, "int8.onnx")
        try:
            if dynamic:
                quantize_dynamic(src, out, per_channel=per_channel, weight_type=QuantType.QInt8)
                how = {"method": "dynamic", "weights": "int8", "activations": "quantized per run (uint8)"}
            else:
                quantize_static(src, out, _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                calibrate_method=CalibrationMethod.MinMax, calibration_providers=providers)
                how = {"method": "static", "format": "QDQ", "weights": "int8", "activations": "int8",
                       "calibration": "MinMax"}
        except OnnxPruneError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise OnnxPruneError(f"onnxruntime's quantizer failed: {first}") from None
        result = onnx.load(out)
    how.update({"per_channel": per_channel, "preparation": prep, "quantizer": "onnxruntime.quantization"})
    return result, how
