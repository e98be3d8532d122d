"""The OpenVINO runner (optional: ``pip install onnxprune[openvino]``).

Models are read by OpenVINO's own ONNX front end and compiled for a device (``CPU``) with
float32 inference precision: OpenVINO's CPU plugin otherwise runs float32 models in bfloat16
where the CPU has it, which changes the numbers a pruned model is verified and measured by.
One stream, so a run is one request on the threads it is given; threads are not pinned to cores.
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
import onnx

from .. import ir
from ..errors import OnnxPruneError
from .base import Port, Runner

HINT = "install it with: pip install 'onnxprune[openvino]'"
_core = None


def _ov():
    try:
        import openvino
    except ImportError:
        raise OnnxPruneError(f"--runtime openvino: OpenVINO is not installed; {HINT}") from None
    return openvino


def core():
    global _core
    if _core is None:
        _core = _ov().Core()
    return _core


def version() -> str:
    return _ov().__version__


def check(device: str) -> None:
    have = core().available_devices
    if device not in have:
        raise OnnxPruneError(f"--device {device}: not an OpenVINO device here; available: {', '.join(have)}")


def _dims(pshape) -> tuple:
    return tuple(d.get_length() if d.is_static else None for d in pshape)


class OpenVinoRunner(Runner):
    runtime = "openvino"

    def __init__(self, compiled, device: str, keep=None):
        self.compiled, self.device, self._keep = compiled, device, keep
        self.request = compiled.create_infer_request()
        self.inputs = [Port(i.get_any_name(), _dims(i.get_partial_shape()), _np_type(i.get_element_type()))
                       for i in compiled.inputs]
        self.outputs = [Port(o.get_any_name(), _dims(o.get_partial_shape()), _np_type(o.get_element_type()))
                        for o in compiled.outputs]
        self._index = {name: k for k, o in enumerate(compiled.outputs) for name in o.get_names()}
        self.threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()

    def run(self, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer({k: np.ascontiguousarray(v) for k, v in feed.items()})
        names = [o.name for o in self.outputs] if outputs is None else outputs
        try:
            return [np.array(res[self._index[n]], copy=True) for n in names]
        except KeyError as e:
            raise OnnxPruneError(f"OpenVINO: the model has no output {e}") from None

    def describe(self) -> str:
        return f"openvino {self.device} ({self.precision})"


def _np_type(t) -> np.dtype | None:
    try:
        return np.dtype(t.to_dtype())
    except Exception:
        return None


def load(proto: onnx.ModelProto | bytes | str, device: str = "CPU", *, threads: int | None = None,
         weights: onnx.ModelProto | None = None, external_dir: str | None = None) -> OpenVinoRunner:
    """Compile ``proto`` (a model, one serialized, or a path) for ``device``."""
    # no pinning: on a shared machine a pinned worker waits for its core (the shipped model: 16-20 ms a run
    # pinned, 0.7 ms not, at load 25 on 2 cores); one stream, so a run is one request on every thread
    config = {"INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False, "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    keep = None
    try:
        c = core()
        if isinstance(proto, (str, os.PathLike)):
            model = c.read_model(str(proto))
        elif isinstance(proto, bytes) and external_dir is None:
            model = c.read_model(proto, b"")
        else:
            keep = tempfile.TemporaryDirectory()  # OpenVINO may map the weights: kept while the runner lives
            f = os.path.join(keep.name, "m.onnx")
            if isinstance(proto, bytes):
                for name in os.listdir(external_dir):
                    os.symlink(os.path.join(external_dir, name), os.path.join(keep.name, name))
                with open(f, "wb") as fh:
                    fh.write(proto)
            elif weights is None and ir.proto_bytes(proto) < ir.TWO_GB and not ir.is_lazy(proto):
                f = None
                model = c.read_model(proto.SerializeToString(), b"")
            else:
                ir.write_external(proto, f, "m.data", extra=weights)
            if f is not None:
                model = c.read_model(f)
        return OpenVinoRunner(c.compile_model(model, device, config), device, keep)
    except OnnxPruneError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise OnnxPruneError(f"OpenVINO cannot load the model: {msg}") from None
