"""The IR layer: model files, external data, the editable graph, shapes and constant values.

Most of the package reaches ONNX through these names (``ir.load``, ``ir.to_graph``, ``ir.infer``...);
stages that read a ModelProto directly (analysis, fold, the metrics) still import onnx themselves.
One job per file:

- ``files``      :class:`Model`, ``load`` (with its checks), ``check``, atomic ``save``, the file's own bytes
- ``external``   external data files, lazy weights left on disk, reading any tensor's value, writing
- ``graph``      graphsurgeon conversion: ``to_graph`` (Constant nodes lifted) and ``from_graph``
- ``shapes``     graph inputs and their dims, ``--input-shape`` specs, shape inference on a skeleton
- ``constants``  the value of a ``Constant`` node (the one reader of its attributes)
- ``proto``      element types, tensor sizes, walking every tensor, copying a model's header
- ``limits``     size thresholds (2 GB, checker, lazy loading), read at call time
- ``wire``       serialized-model surgery without re-serializing the weights
"""

from __future__ import annotations

from . import limits
from .constants import constant_tensor, constant_value
from .external import (has_external, is_lazy, lazy_dir, materialize, model_size_bytes, tensor_to_array,
                       write_external)
from .files import Model, check, check_structure, file_bytes, load, save, serialized, structure_digest
from .graph import WEIGHT_OPS, from_graph, name_nodes, to_graph
from .proto import all_tensors, copy_header, fresh_name, np_dtype, proto_bytes, read_counts, tensor_bytes
from .shapes import (graph_inputs, infer, infer_shapes, input_dims, input_dtype, is_mask_input, parse_input_shapes,
                     resolve_input_shapes, skeleton, with_input_shapes)

__all__ = [
    "Model", "WEIGHT_OPS", "all_tensors", "check", "check_structure", "constant_tensor", "constant_value",
    "copy_header", "file_bytes", "fresh_name", "from_graph", "graph_inputs", "has_external", "infer", "infer_shapes",
    "input_dims", "input_dtype", "is_lazy", "is_mask_input", "lazy_dir", "limits", "load", "materialize", "model_size_bytes",
    "name_nodes", "np_dtype", "parse_input_shapes", "proto_bytes", "read_counts", "resolve_input_shapes",
    "save", "serialized", "skeleton", "structure_digest", "tensor_bytes", "tensor_to_array", "to_graph",
    "with_input_shapes", "write_external",
]


def __getattr__(name: str):
    """``ir.TWO_GB``, ``ir.CHECK_WEIGHTS_BYTES``, ``ir.LAZY_BYTES``: the current values in ``limits``
    (a test lowers them there)."""
    if name in ("TWO_GB", "CHECK_WEIGHTS_BYTES", "LAZY_BYTES"):
        return getattr(limits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
