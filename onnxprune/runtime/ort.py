"""The onnxruntime runner: any list of execution providers, any session options.

User session options (``Target.options``) are applied first; what a caller needs for
correctness comes after and wins (graph optimisations off so tapped tensor names survive,
the thread count of a benchmark, idle threads that sleep in interleaved timing).
"""

from __future__ import annotations

import os
import tempfile
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .. import ir
from ..errors import OnnxPruneError
from .base import Port, Runner

LEVELS = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
MODES = {"sequential": ort.ExecutionMode.ORT_SEQUENTIAL, "parallel": ort.ExecutionMode.ORT_PARALLEL}
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # failures become our one-line errors, not onnxruntime log lines


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def check_providers(providers: Sequence[str]) -> None:
    have = available_providers()
    for p in providers:
        if p not in have:
            raise OnnxPruneError(f"--provider {p}: not available in this onnxruntime {ort.__version__}; "
                                 f"available: {', '.join(have)}")


def _option_value(key: str, value):
    """``value`` (a string from the command line, or already typed) for SessionOptions attribute ``key``."""
    current = getattr(ort.SessionOptions(), key)
    if key == "graph_optimization_level":
        if isinstance(value, ort.GraphOptimizationLevel):
            return value
        v = str(value).lower().removeprefix("ort_").removeprefix("enable_").removesuffix("_all")
        v = {"0": "disable", "1": "basic", "2": "extended", "99": "all", "3": "all"}.get(v, v)
        if v not in LEVELS:
            raise OnnxPruneError(f"--session-option graph_optimization_level={value}: expected one of "
                                 f"{', '.join(LEVELS)}")
        return LEVELS[v]
    if key == "execution_mode":
        if isinstance(value, ort.ExecutionMode):
            return value
        v = str(value).lower().removeprefix("ort_")
        if v not in MODES:
            raise OnnxPruneError(f"--session-option execution_mode={value}: expected one of {', '.join(MODES)}")
        return MODES[v]
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if str(value).lower() not in ("0", "1", "true", "false"):
            raise OnnxPruneError(f"--session-option {key}={value}: expected true or false")
        return str(value).lower() in ("1", "true")
    if isinstance(current, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise OnnxPruneError(f"--session-option {key}={value}: expected an integer") from None
    return value


def check_options(options: Mapping[str, object]) -> None:
    """Raise :class:`OnnxPruneError` for a key that is neither a SessionOptions attribute nor a
    dotted session config entry (``session.intra_op.allow_spinning``), or a value of the wrong type."""
    _apply(ort.SessionOptions(), options)


def _apply(so: ort.SessionOptions, options: Mapping[str, object]) -> None:
    for key, value in options.items():
        if "." in key:
            so.add_session_config_entry(key, str(value))
        elif key.startswith("_") or not hasattr(so, key) or callable(getattr(so, key)):
            raise OnnxPruneError(f"--session-option {key}: not an onnxruntime session option (an attribute of "
                                 "SessionOptions such as intra_op_num_threads, or a dotted config entry)")
        else:
            setattr(so, key, _option_value(key, value))


def _dtype(type_str: str) -> np.dtype | None:
    inner = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else ""
    names = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool"}
    try:
        return np.dtype(names.get(inner, inner))
    except TypeError:
        return None


class OrtRunner(Runner):
    runtime = "onnxruntime"

    def __init__(self, sess: ort.InferenceSession):
        self.sess = sess
        self.providers = list(sess.get_providers())
        self.device = self.providers[0]
        self.inputs = [Port(i.name, tuple(i.shape or ()), _dtype(i.type)) for i in sess.get_inputs()]
        self.outputs = [Port(o.name, tuple(o.shape or ()), _dtype(o.type)) for o in sess.get_outputs()]
        so = sess.get_session_options()
        self.threads = so.intra_op_num_threads
        self.options = {"intra_op_num_threads": so.intra_op_num_threads,
                        "graph_optimization_level": str(so.graph_optimization_level).rsplit(".", 1)[-1]}

    def run(self, outputs: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.sess.run(None if outputs is None else list(outputs), dict(feed), _QUIET)

    def observed(self, keys: Sequence[str]) -> dict:
        """The session's own values of these option keys (what really reached it)."""
        so = self.sess.get_session_options()
        out = dict(self.options)
        for k in keys:
            if "." in k:
                out[k] = so.get_session_config_entry(k)
            elif hasattr(so, k):
                v = getattr(so, k)
                out[k] = str(v).rsplit(".", 1)[-1] if isinstance(v, (ort.GraphOptimizationLevel, ort.ExecutionMode)) \
                    else v
        return out


def load(proto: onnx.ModelProto | bytes, providers: Sequence[str], options: Mapping[str, object], *,
         threads: int | None = None, optimize: bool = True, sequential: bool = True,
         weights: onnx.ModelProto | None = None, spinning: bool = True, layout: bool = True,
         external_dir: str | None = None) -> OrtRunner:
    """An onnxruntime runner; see :func:`onnxprune.runtime.session` for the keywords."""
    so = ort.SessionOptions()
    so.log_severity_level = 4
    _apply(so, options)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not layout and so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", external_dir)
    providers = list(providers)
    try:
        if isinstance(proto, (bytes, str, os.PathLike)):
            return OrtRunner(ort.InferenceSession(proto if isinstance(proto, bytes) else str(proto), so,
                                                  providers=providers))
        if weights is None and ir.proto_bytes(proto) < ir.TWO_GB and not ir.is_lazy(proto):
            return OrtRunner(ort.InferenceSession(proto.SerializeToString(), so, providers=providers))
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "m.onnx")
            ir.write_external(proto, f, "m.data", extra=weights)
            return OrtRunner(ort.InferenceSession(f, so, providers=providers))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise OnnxPruneError(f"onnxruntime cannot load the model: {msg}") from None
