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


def int8_activations(proto: onnx.ModelProto) -> bool:
    """Whether some ``MatMulNBits`` lets onnxruntime round its activations (``accuracy_level`` > 0)."""
    return any(n.op_type == "MatMulNBits" and n.domain == MS and
               any(a.name == "accuracy_level" and a.i > 0 for a in n.attribute) for n in proto.graph.node)


def float_activations(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``proto`` whose ``MatMulNBits`` compute with float activations (``accuracy_level`` 0),
    or None when none asks for less. With ``accuracy_level`` 4 onnxruntime rounds each activation block
    to int8, so a change of 1e-6 anywhere can flip a rounding and no two graphs compare exactly;
    verification compares the pruned weights and structure at float precision instead."""
    if not int8_activations(proto):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for n in out.graph.node:
        if n.op_type == "MatMulNBits" and n.domain == MS:
            for a in n.attribute:
                if a.name == "accuracy_level":
                    a.i = 0
    return out


FLOAT_NOTE = ("verified with MatMulNBits' accuracy_level 0 (float activations) in both models: at the saved "
              "accuracy_level onnxruntime rounds activations to int8, where a change of 1e-6 flips roundings, "
              "so no exact comparison exists there; the saved model keeps its accuracy_level")
