"""A folder of images (PNG, JPEG, BMP) as model input data, decoded one batch at a time.

    data = open_images("calib/", proto, resize=256, mean="imagenet", std="imagenet")
    for feed in data.batches(32):        # {input name: [32, 3, 224, 224] float32}
        ...

``open_images`` returns a plain :class:`~onnxprune.data.arrays.ArrayData` whose one
array is an :class:`ImageFolder`: a lazy array over the files. Slicing it (or
indexing it with a list of positions) gives another lazy view; ``np.asarray``
(which ``ArrayData.batches`` applies to each batch) decodes just those files.
So every consumer of ``ArrayData`` (calibration, reconstruction, evaluation,
fine-tuning) reads an image folder too, and memory follows the batch size, not
the folder.

Files are found recursively and sorted. When every image sits in a first-level
subfolder (``root/<class>/<file>``), the labels are the index of that subfolder
among the sorted subfolder names, as in torchvision's ``ImageFolder``;
otherwise there are no labels. Size, layout (NCHW/NHWC), channel count and
dtype come from the model's single input; float inputs are scaled to ``[0, 1]``
then normalised with ``mean``/``std``, integer inputs get the raw pixels.
Pillow is imported lazily (``pip install onnxprune[images]``).
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .. import ir
from ..errors import OnnxPruneError
from .arrays import ArrayData

_NOTED: list = []   # the first image that set off Pillow's decompression-bomb warning
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
PRESETS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise OnnxPruneError("reading an image folder needs Pillow: pip install onnxprune[images]") from None
    return Image


class ImagePath(str):
    """A path to an image folder that remembers how to decode it (the CLI's image flags).

    It is a ``str``, so it passes wherever a data spec does (``open_data``, ``Pruner(calib=...)``,
    JSON reports); ``open_data`` hands ``options`` to :func:`open_images`.
    """

    options: dict

    def __new__(cls, path: str | Path, **options) -> "ImagePath":
        s = super().__new__(cls, str(path))
        s.options = options
        return s


@dataclass(frozen=True)
class Decoder:
    """How one file becomes one sample: ``[H, W, C]`` pixels in the model's dtype, normalised."""

    size: tuple[int, int]                       # (height, width) fed to the model
    channels: int = 3                           # 1 (grayscale) or 3
    resize: int | None = None                   # shorter side before a center crop; None: resize to size
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: np.dtype = np.dtype(np.float32)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        h, w = self.size
        return (self.channels, h, w) if self.layout == "NCHW" else (h, w, self.channels)

    def load(self, path: Path) -> np.ndarray:
        """One image in the model's layout (without the batch axis)."""
        Image = _pil()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    pixels = im.size[0] * im.size[1]
                    im = self._fit(im.convert("L" if self.channels == 1 else "RGB"), Image)
                    px = np.asarray(im, dtype=np.uint8)
            if caught and not _NOTED:  # Pillow's multi-line warning becomes one line, once per run
                _NOTED.append(path)
                print(f"note: {path}: {pixels / 1e6:.0f} megapixels, over Pillow's decompression-bomb threshold "
                      f"({(Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f}); decoded anyway (other large images "
                      "are not reported)", file=sys.stderr)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise OnnxPruneError(f"{path}: cannot decode image ({e.__class__.__name__}); remove it or "
                                 "convert it to PNG/JPEG") from None
        px = px.reshape(px.shape[0], px.shape[1], self.channels)
        if self.channel_order == "BGR":
            px = px[..., ::-1]
        if self.dtype.kind != "f":
            x = px.astype(self.dtype)
        else:
            x = ((px.astype(np.float32) / 255.0 - np.asarray(self.mean, np.float32))
                 / np.asarray(self.std, np.float32)).astype(self.dtype)
        return x if self.layout == "NHWC" else x.transpose(2, 0, 1)

    def _fit(self, im, Image):
        h, w = self.size
        if self.resize is None:
            return im.resize((w, h), Image.BILINEAR)
        scale = self.resize / min(im.width, im.height)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.BILINEAR)
        left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
        return im.crop((left, top, left + w, top + h))


class ImageFolder:
    """A lazy ``[N, *sample_shape]`` array over image files.

    ``x[i]`` decodes one image; ``x[a:b]``, ``x[[i, j, ...]]`` and boolean masks give lazy views;
    ``np.asarray(x)`` decodes every file of the view.
    """

    def __init__(self, files: Sequence[Path], decoder: Decoder):
        self.files = np.asarray([str(f) for f in files], dtype=object)
        self.decoder = decoder

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.files), *self.decoder.sample_shape)

    @property
    def dtype(self) -> np.dtype:
        return self.decoder.dtype

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.decoder.load(Path(self.files[key]))
        return ImageFolder(self.files[key], self.decoder)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        for i, f in enumerate(self.files):
            out[i] = self.decoder.load(Path(f))
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"ImageFolder({len(self)} files, shape={self.shape}, dtype={self.dtype})"


def _norm(name: str, value, channels: int, preset_index: int, default: float) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    if isinstance(value, str):
        if value in PRESETS:
            value = PRESETS[value][preset_index]
        else:
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                raise OnnxPruneError(f"--{name} '{value}': expected numbers like 0.5,0.5,0.5 or "
                                     f"one of {', '.join(PRESETS)}") from None
    vals = tuple(float(v) for v in (value if isinstance(value, Sequence) else [value]))
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise OnnxPruneError(f"--{name}: {len(vals)} values given, the model's input has {channels} channels")
    if name == "std" and any(v == 0 for v in vals):
        raise OnnxPruneError("--std: values must be non-zero")
    return vals


def _layout(dims: list, layout: str | None) -> str:
    if layout is not None:
        if layout not in ("NCHW", "NHWC"):
            raise OnnxPruneError(f"--layout '{layout}': expected NCHW or NHWC")
        return layout
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    raise OnnxPruneError(f"cannot tell the layout of input shape {dims}; pass --layout NCHW or NHWC")


def _size(value) -> list[int] | None:
    """``224``, ``"224"``, ``"224x320"`` (height x width) or ``(224, 320)``."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.lower().split("x")]
        except ValueError:
            raise OnnxPruneError(f"--image-size '{value}': expected N or HxW, e.g. 224 or 224x320") from None
    hw = [int(value)] * 2 if isinstance(value, (int, np.integer)) else [int(v) for v in value]
    if len(hw) == 1:
        hw = hw * 2
    if len(hw) != 2 or min(hw) < 1:
        raise OnnxPruneError(f"--image-size {value}: expected N or HxW with positive numbers")
    return hw


def list_images(path: str | Path) -> list[Path]:
    """Image files under ``path`` (recursively, sorted), or ``[path]`` for a single image file."""
    root = Path(path)
    if not root.exists():
        raise OnnxPruneError(f"{root}: no such image folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise OnnxPruneError(f"{root}: no images found (looked for {', '.join(EXTENSIONS)} files)")
    return files


def folder_labels(root: str | Path, files: Sequence[Path]) -> np.ndarray | None:
    """Class index per file, or None unless every file is in a first-level subfolder.

    The classes are all first-level subfolders, sorted by name (empty ones included, so a
    folder per class keeps its index even when it holds no image).
    """
    root = Path(root)
    if root.is_file():
        return None
    parts = [f.relative_to(root).parts for f in files]
    if any(len(p) < 2 for p in parts):
        return None
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[p[0]] for p in parts], dtype=np.int64)


def is_image_path(spec: str | Path) -> bool:
    """A folder, or a file with an image extension."""
    p = Path(spec)
    return p.is_dir() or p.suffix.lower() in EXTENSIONS


def open_images(path: str | Path, proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *,
                size: int | str | Sequence[int] | None = None, resize: int | None = None, mean=None, std=None,
                channel_order: str = "RGB", layout: str | None = None) -> ArrayData:
    """Data for ``proto``'s single image input from a folder (shape, dtype and layout from the model)."""
    _pil()
    inputs = ir.graph_inputs(proto)
    if len(inputs) != 1:
        raise OnnxPruneError(f"an image folder feeds models with one input; this model has {len(inputs)} "
                             f"({', '.join(i.name for i in inputs)}); use an .npz instead")
    vi = inputs[0]
    dims = list((input_shapes or {}).get(vi.name) or ir.input_dims(vi))
    if len(dims) != 4:
        raise OnnxPruneError(f"input '{vi.name}' has rank {len(dims)}; an image folder needs a rank-4 image input")
    lay = _layout(dims, layout)
    c = dims[1] if lay == "NCHW" else dims[3]
    c = c if isinstance(c, int) and c > 0 else 3
    if c not in (1, 3):
        raise OnnxPruneError(f"input '{vi.name}' has {c} channels; images give 1 (grayscale) or 3")
    hw = _size(size) or ([dims[2], dims[3]] if lay == "NCHW" else [dims[1], dims[2]])
    if not all(isinstance(d, int) and d > 0 for d in hw):
        raise OnnxPruneError(f"input '{vi.name}' has symbolic height/width {dims}; pass --image-size")
    if channel_order not in ("RGB", "BGR"):
        raise OnnxPruneError(f"--channel-order '{channel_order}': expected RGB or BGR")
    if resize is not None and int(resize) < 1:
        raise OnnxPruneError(f"--resize {resize}: must be a positive number of pixels")
    decoder = Decoder((hw[0], hw[1]), c, None if resize is None else int(resize), _norm("mean", mean, c, 0, 0.0),
                      _norm("std", std, c, 1, 1.0), channel_order, lay, ir.input_dtype(vi))
    files = list_images(path)
    meta = {"layout": lay, "channels": c, "size": list(decoder.size), "resize": decoder.resize,
            "mean": list(decoder.mean), "std": list(decoder.std), "channel_order": channel_order}
    return ArrayData({vi.name: ImageFolder(files, decoder)}, folder_labels(path, files), kind="images",
                     source=str(path), meta=meta)
