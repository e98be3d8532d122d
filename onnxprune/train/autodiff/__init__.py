"""Reverse-mode gradients built as ONNX graphs that run in onnxruntime.

    from onnxprune.train.autodiff import build_gradient_model
    gm = build_gradient_model(proto, wrt=["conv1.weight", "relu_3"], loss="cross_entropy")
    sess = runtime.session(gm.proto)
    loss, g_w, g_a = sess.run([gm.loss_name, *gm.grad_names.values()], {"input": x, "labels": y})

One reverse-mode rule per op type lives in :data:`BACKWARD`; an op on the path
without a rule raises :class:`~onnxprune.errors.OnnxPruneError` naming it.
"""

from .build import GradientModel, build_gradient_model, differentiable
from .losses import LOSSES
from .backward import BACKWARD

__all__ = ["BACKWARD", "GradientModel", "LOSSES", "build_gradient_model", "differentiable"]
