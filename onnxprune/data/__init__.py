"""Model input data: arrays, ``.npz`` files, image folders and random feeds behind one reader protocol.

``open_data`` is the one front door (the CLI's ``--data``/``--calib`` and the Python API both go
through it). ``arrays`` holds what every reader returns, ``readers`` the ``.npz`` and random
readers and the shapes a model takes from its data, ``images`` image folders decoded per batch.
"""

from __future__ import annotations

import numpy as np
import onnx

from .. import ir
from .arrays import ArrayData, DataSource
from .images import ImagePath, is_image_path, open_images
from .readers import bind_shapes, checked_arrays, fit_empty, load_npz, random_data, random_feed

__all__ = ["ArrayData", "DataSource", "ImagePath", "bind_shapes", "fit_empty", "is_image_path", "load_npz",
           "open_data", "open_images", "random_data", "random_feed"]


def open_data(spec: str | ArrayData | dict | np.ndarray | None, proto: onnx.ModelProto, input_shapes: dict[str, list[int]],
              num_random: int = 8) -> ArrayData | None:
    """``None`` -> None, ``"random"`` -> ``num_random`` synthetic samples (symbolic dims = 1 unless
    ``input_shapes`` fixes them), a folder (or image file) -> images, a path -> .npz.

    An ``ArrayData`` is returned as it is. A folder decodes with the model's input size and no
    normalisation unless ``spec`` is an ``images.ImagePath`` carrying the decoding options.
    """
    if spec is None or isinstance(spec, ArrayData):
        return spec
    if isinstance(spec, np.ndarray):   # the Python API: one array for a one-input model
        inputs = ir.graph_inputs(proto)
        spec = {inputs[0].name if len(inputs) == 1 else "input": spec}
    if isinstance(spec, dict):         # the Python API: {input name: array, optional "labels": ints}
        return checked_arrays(spec, proto, input_shapes, "arrays")
    if spec == "random":
        return random_data(proto, ir.resolve_input_shapes(proto, input_shapes), num_random)
    if isinstance(spec, ImagePath) or is_image_path(spec):
        return open_images(spec, proto, input_shapes, **getattr(spec, "options", {}))
    return load_npz(spec, proto, input_shapes)
