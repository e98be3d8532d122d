"""Hidden width: rotate the residual stream of a normalised transformer, then slice it.

    stream = find_stream(proto)                      # writers, readers, norms (or NoStream(reason))
    rotated = rotate.apply(proto, stream, Q)         # exact for a full-rank Q: verified like any prune
    result = slice_hidden(model, calib=data, width=448)   # Q from calibration PCA, narrower stream

Computational invariance (SliceGPT, Ashkboos et al. 2024) on the ONNX graph: RMSNorm(x Q) =
RMSNorm(x) Q for an orthogonal Q, so once each norm's scale and bias live in the layers it feeds,
the stream can be expressed in any orthonormal basis; in the basis of the principal components of
the (normalised) stream, its last directions carry little and are removed. See ``docs/transformers.md``.
"""

from __future__ import annotations

from .stream import NoStream, Stream, find_stream
from .slicing import HiddenResult, slice_hidden, name_nodes

__all__ = ["find_stream", "Stream", "NoStream", "slice_hidden", "HiddenResult", "name_nodes"]
