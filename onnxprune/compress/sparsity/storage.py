"""A model's size on disk, plain and compressed (zstd when installed, else gzip)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import onnx

from ...ir import external, safety


# ---------------------------------------------------------------- storage

def compression_method() -> str:
    """``"zstd"`` when the optional ``zstandard`` package is importable, else ``"gzip"``."""
    try:
        import zstandard  # noqa: F401
        return "zstd"
    except ImportError:
        return "gzip"


def model_files(path: str | os.PathLike) -> list[Path]:
    """A saved model file and the external data files it references."""
    p = Path(path)
    files = [p]
    m = onnx.load(str(p), load_external_data=False)
    for loc in external.locations(m):
        try:
            f = safety.contained(p.parent, loc)  # data outside the model's folder is never read
        except ValueError:
            continue
        if f not in files and f.exists():
            files.append(f)
    return files


def compressed_size(path: str | os.PathLike, method: str | None = None) -> int:
    """Bytes of the model file (plus external data) after zstd (level 10) or gzip (level 9)."""
    method = method or compression_method()
    if method == "zstd":
        import zstandard
        comp = zstandard.ZstdCompressor(level=10).compressobj()
    elif method == "gzip":
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    else:
        raise ValueError(method)
    total = 0
    for f in model_files(path):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                total += len(comp.compress(chunk))
    return total + len(comp.flush())
