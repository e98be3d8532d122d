"""The value of a ``Constant`` node: the one place that reads its attributes.

A ``Constant`` holds its value in one of several attributes (``value``, ``value_float(s)``,
``value_int(s)``, ``value_string(s)``; ``sparse_value`` is not a dense value). ``constant_tensor``
gives it as a TensorProto without decoding (shape and type only are cheap), ``constant_value``
as an array.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from .external import tensor_to_array

_LISTS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64,
          "value_string": np.object_, "value_strings": np.object_}


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The value of a ``Constant`` node as a tensor (its own ``value`` tensor, not a copy), or None
    when it has no dense value (``sparse_value``)."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in _LISTS:
            value = np.asarray(onnx.helper.get_attribute_value(a), dtype=_LISTS[a.name])
            return numpy_helper.from_array(value, node.output[0] if node.output else "")
    return None


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node as an array (read from disk when it is lazy external data),
    or None when it has no dense value."""
    t = constant_tensor(node)
    return None if t is None else tensor_to_array(t)
