"""onnxruntime's contrib ops as onnx.checker sees them.

The checker knows the ONNX domains only. A node of onnxruntime's own domain (``com.microsoft``)
passes it unjudged, and onnxruntime also registers ops in the default domain (its RMSNorm,
``SimplifiedLayerNormalization``), which the checker rejects. :func:`for_checker` moves those nodes
to onnxruntime's domain in a copy, so the checker judges everything else; :func:`ort_load` is the
check for what it cannot judge: onnxruntime's own load of the model.
"""

from __future__ import annotations

import onnx

from ..errors import OnnxPruneError

MS = "com.microsoft"
# ops onnxruntime registers in the default ONNX domain that ONNX itself does not define
ORT_DEFAULT_DOMAIN = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization")
_DEFAULT = ("", "ai.onnx")


def contrib_ops(proto: onnx.ModelProto) -> list[str]:
    """Op types of the main graph that only onnxruntime knows (sorted, each once)."""
    return sorted({n.op_type for n in proto.graph.node
                   if n.domain == MS or (n.domain in _DEFAULT and n.op_type in ORT_DEFAULT_DOMAIN)})


def for_checker(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move onnxruntime's default-domain ops of ``model`` (a copy the caller owns) to its domain."""
    moved = False
    for n in model.graph.node:
        if n.domain in _DEFAULT and n.op_type in ORT_DEFAULT_DOMAIN:
            n.domain = MS
            moved = True
    if moved and not any(i.domain == MS for i in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS, 1))
    return model


def note(ops: list[str]) -> str:
    """The report's sentence for a model checked by onnxruntime's load."""
    return (f"onnx.checker cannot judge onnxruntime's contrib ops ({', '.join(ops)}): onnxruntime's own load "
            "checked the model")


def ort_load(model: str | bytes, what: str) -> None:
    """Create an onnxruntime session for ``model`` (a path, or serialized bytes); failure is a user error."""
    from .. import runtime  # the one place that loads models into a runtime (imported late: it builds on ir)

    try:
        runtime.session(model, role="reference", optimize=False)
    except OnnxPruneError as e:
        why = str(e).removeprefix("onnxruntime cannot load the model: ")[:300]
        raise OnnxPruneError(f"{what}: onnxruntime cannot load the model ({why}); onnx.checker cannot judge "
                             "its contrib ops, so onnxruntime's load is the check") from None
