"""onnxruntime sessions: one place that builds them, runs batches and taps intermediate tensors."""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from .. import ir
from ..errors import OnnxPruneError


def session(proto: onnx.ModelProto | bytes, *, threads: int | None = None, optimize: bool = True,
            sequential: bool = True, weights: onnx.ModelProto | None = None, spinning: bool = True,
            layout: bool = True, external_dir: str | None = None) -> ort.InferenceSession:
    """A CPU session for ``proto`` (a model, or one serialized); ``optimize=False`` keeps every
    tensor name intact. ``external_dir``: where a serialized model's external data files are.

    ``layout=False`` skips the layout transforms (NCHWc), which can drop a tensor exposed as an
    extra graph output (onnxruntime 1.32) and then fail to load the model.

    ``spinning=False`` stops idle worker threads from busy-waiting, so two sessions timed in turn
    (interleaved benchmarks) do not steal each other's cores.

    ``weights``: a model whose initializers fill in those ``proto`` reads but lacks (a
    weight-free variant of a large model shares the original's weights, never a copy).
    Models over 2 GB, and those, go through a temporary file with external data.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures become our one-line errors, not onnxruntime log lines
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if sequential:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not layout:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    providers = ["CPUExecutionProvider"]
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", external_dir)
    try:
        if isinstance(proto, bytes):
            return ort.InferenceSession(proto, so, providers=providers)
        if weights is None and ir.proto_bytes(proto) < ir.TWO_GB and not ir.is_lazy(proto):
            return ort.InferenceSession(proto.SerializeToString(), so, providers=providers)
        with tempfile.TemporaryDirectory() as d:
            f = os.path.join(d, "m.onnx")
            ir.write_external(proto, f, "m.data", extra=weights)
            return ort.InferenceSession(f, so, providers=providers)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise OnnxPruneError(f"onnxruntime cannot load the model: {msg}") from None


def tensor_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Type of every tensor ONNX shape inference can type."""
    types = {}
    for name, (_, elem) in ir.infer(proto).items():
        t = onnx.TypeProto()
        t.tensor_type.elem_type = elem
        types[name] = t
    return types


def with_outputs(proto: onnx.ModelProto, names: Iterable[str], types: dict[str, onnx.TypeProto] | None = None
                 ) -> onnx.ModelProto:
    """A copy of ``proto`` that also outputs the named intermediate tensors."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    types = types if types is not None else tensor_types(proto)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n in have:
            continue
        vi = m.graph.output.add()
        vi.name = n
        if n in types:
            vi.type.tensor_type.elem_type = types[n].tensor_type.elem_type
        have.add(n)
    return m


def run(sess: ort.InferenceSession, feed: dict[str, np.ndarray], outputs: list[str] | None = None
        ) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def run_batches(sess: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]],
                outputs: list[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    for feed in batches:
        yield run(sess, feed, outputs)
