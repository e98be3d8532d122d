"""The one table of reverse-mode rules, keyed by ONNX op type (default domain).

A rule is ``rule(ctx, output_grads) -> input_grads``: ``ctx`` is a
:class:`~onnxprune.train.autodiff.emit.RuleContext` (the forward node, its static
shapes, constant input values and a node emitter), ``output_grads`` has one
entry per node output (None where no gradient flows) and the result has one
entry per node input (None where no gradient is needed or defined). An op
missing from this table stops the gradient: building raises an error naming it.
"""

from __future__ import annotations

from typing import Callable

from onnx import NodeProto

from . import elementwise as ew
from . import layout
from . import linear
from . import windows
from .emit import RuleContext

BackwardRule = Callable[[RuleContext, list], list]

BACKWARD: dict[str, BackwardRule] = {
    # convolution, pooling, dense
    "Conv": windows.conv,
    "ConvTranspose": windows.conv_transpose,
    "MaxPool": windows.max_pool,
    "AveragePool": windows.average_pool,
    "GlobalAveragePool": ew.global_average_pool,
    "GlobalMaxPool": ew.global_max_pool,
    "Gemm": linear.gemm,
    "MatMul": linear.matmul,
    # normalisation
    "BatchNormalization": ew.batch_norm,
    "LayerNormalization": ew.layer_norm,
    # activations
    "Relu": ew.relu,
    "LeakyRelu": ew.leaky_relu,
    "Clip": ew.clip,
    "Sigmoid": ew.sigmoid,
    "HardSigmoid": ew.hard_sigmoid,
    "HardSwish": ew.hard_swish,
    "Tanh": ew.tanh,
    "Erf": ew.erf,
    "Gelu": ew.gelu,
    "PRelu": ew.prelu,
    "Softmax": ew.softmax,
    "LogSoftmax": ew.log_softmax,
    # arithmetic with broadcasting
    "Add": ew.add,
    "Sum": ew.add,
    "Sub": ew.sub,
    "Mul": ew.mul,
    "Div": ew.div,
    "Neg": ew.neg,
    "Abs": ew.abs_,
    "Sqrt": ew.sqrt,
    "Exp": ew.exp,
    "Log": ew.log,
    "Reciprocal": ew.reciprocal,
    "Pow": ew.pow_,
    "Where": ew.where,
    # reductions
    "ReduceMean": ew.reduce,
    "ReduceSum": ew.reduce,
    "ReduceMax": ew.reduce_extreme,
    "ReduceMin": ew.reduce_extreme,
    # data movement
    "Identity": ew.identity,
    "Dropout": ew.identity,
    "Reshape": layout.reshape_back,
    "Flatten": layout.reshape_back,
    "Squeeze": layout.reshape_back,
    "Unsqueeze": layout.reshape_back,
    "Transpose": layout.transpose,
    "Concat": layout.concat,
    "Split": layout.split,
    "Slice": layout.slice_,
    "Pad": layout.pad,
    "Resize": layout.resize,
}

# Ops whose gradient needs a newer opset than 13 in some configurations; the builder upgrades a copy.
NEEDS_OPSET: dict[str, Callable[[NodeProto], int]] = {
    "MaxPool": windows.max_pool_opset,
}
