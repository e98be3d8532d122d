"""A folder of images (PNG, JPEG, BMP) as calibration data, behind the same protocol as ``data.ArrayData``.

    images = open_images("calib/", proto, resize=256, mean="imagenet", std="imagenet")
    for feed in images.batches(32):      # {input name: [32, 3, 224, 224] float32}
        ...

Files are found recursively and sorted, and decoded one batch at a time, so
memory does not grow with the folder. Size, layout (NCHW/NHWC), channel count
and dtype come from the model's single input; float inputs are scaled to
``[0, 1]`` then normalised with ``mean``/``std``, integer inputs get the raw
pixels. Pillow is imported lazily (``pip install onnxprune[images]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from . import ir
from .errors import OnnxPruneError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
PRESETS = {"imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise OnnxPruneError("reading an image folder needs Pillow: pip install onnxprune[images]") from None
    return Image


@dataclass
class ImageFolder:
    """Images decoded per batch into the model's input layout."""

    files: list[Path]
    input_name: str
    size: tuple[int, int]                       # (height, width) fed to the model
    channels: int = 3                           # 1 (grayscale) or 3
    resize: int | None = None                   # shorter side before a center crop; None: resize to size
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    dtype: np.dtype = np.dtype(np.float32)
    source: str = ""
    kind: str = "images"
    labels: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return len(self.files)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        for start in range(0, n, batch_size):
            arr = np.stack([self.load(f) for f in self.files[start:min(start + batch_size, n)]])
            yield {self.input_name: arr if self.layout == "NHWC" else np.ascontiguousarray(arr.transpose(0, 3, 1, 2))}

    def load(self, path: Path) -> np.ndarray:
        """One image as [H, W, C] in the model's dtype, normalised."""
        Image = _pil()
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                im = self._fit(im, Image)
                px = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise OnnxPruneError(f"{path}: cannot decode image ({e.__class__.__name__}); remove it or "
                                 "convert it to PNG/JPEG") from None
        px = px.reshape(px.shape[0], px.shape[1], self.channels)
        if self.channel_order == "BGR":
            px = px[..., ::-1]
        if self.dtype.kind != "f":
            return px.astype(self.dtype)
        x = px.astype(np.float32) / 255.0
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(self.dtype)

    def _fit(self, im, Image):
        h, w = self.size
        if self.resize is None:
            return im.resize((w, h), Image.BILINEAR)
        scale = self.resize / min(im.width, im.height)
        rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
        im = im.resize((rw, rh), Image.BILINEAR)
        left, top = int(round((rw - w) / 2.0)), int(round((rh - h) / 2.0))
        return im.crop((left, top, left + w, top + h))


def _norm(name: str, value, channels: int, preset_index: int, default: float) -> tuple[float, ...]:
    if value is None:
        return (default,) * channels
    if isinstance(value, str):
        if value not in PRESETS:
            try:
                value = [float(v) for v in value.split(",")]
            except ValueError:
                raise OnnxPruneError(f"--{name} '{value}': expected numbers like 0.5,0.5,0.5 or "
                                     f"one of {', '.join(PRESETS)}") from None
        else:
            value = PRESETS[value][preset_index]
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
            raise OnnxPruneError(f"layout '{layout}': expected NCHW or NHWC")
        return layout
    if dims[1] in (1, 3):
        return "NCHW"
    if dims[3] in (1, 3):
        return "NHWC"
    raise OnnxPruneError(f"cannot tell the layout of input shape {dims}; pass layout NCHW or NHWC")


def list_images(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.exists():
        raise OnnxPruneError(f"{root}: no such image folder")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                 if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise OnnxPruneError(f"{root}: no images found (looked for {', '.join(EXTENSIONS)} files)")
    return files


def open_images(path: str | Path, proto: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, *,
                size: int | Sequence[int] | None = None, resize: int | None = None, mean=None, std=None,
                channel_order: str = "RGB", layout: str | None = None) -> ImageFolder:
    """An :class:`ImageFolder` for ``proto``'s single image input (shape, dtype and layout from the model)."""
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
    hw = [dims[2], dims[3]] if lay == "NCHW" else [dims[1], dims[2]]
    if size is not None:
        hw = [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]
    if not all(isinstance(d, int) and d > 0 for d in hw):
        raise OnnxPruneError(f"input '{vi.name}' has symbolic height/width {dims}; pass an image size")
    if channel_order not in ("RGB", "BGR"):
        raise OnnxPruneError(f"channel order '{channel_order}': expected RGB or BGR")
    return ImageFolder(list_images(path), vi.name, (hw[0], hw[1]), c, resize,
                       _norm("mean", mean, c, 0, 0.0), _norm("std", std, c, 1, 1.0), channel_order, lay,
                       ir.input_dtype(vi), source=str(path))
