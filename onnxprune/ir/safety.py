"""File safety in one place: atomic outputs with ordinary permissions, and paths that must not meet.

``atomic_output(path)`` yields a binary file handle on a temporary file created exclusively
(``O_EXCL``: a planted file or symlink is never opened) under an unpredictable name in the
output's folder; on success it gets the permissions a plain ``open(path, "w")`` would give
(``0666 & ~umask`` for a new file, the old mode when replacing a file) and is renamed over
``path`` (a symlink at ``path`` is replaced, never written through). On failure nothing is left.

``same_file`` and ``colliding`` compare paths after resolving symlinks (and hard links, for files
that exist); ``contained`` applies onnx's external-data rules to a location.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux), else set-and-restore."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def new_file_mode(path: str | os.PathLike) -> int:
    """The mode ``open(path, "w")`` leaves: an existing regular file keeps its mode, a new one gets
    ``0666 & ~umask``."""
    try:
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_umask()


def folder_of(path: str | os.PathLike) -> Path:
    p = Path(path)
    return p.parent if str(p.parent) else Path(".")


def temp_beside(path: str | os.PathLike, suffix: str = ".tmp") -> tuple[int, str]:
    """An exclusively created temporary file (fd, name) with an unpredictable name in ``path``'s folder."""
    p = Path(path)
    return tempfile.mkstemp(prefix=f".{p.name}.", suffix=suffix, dir=folder_of(p))


def finish_temp(tmp: str, path: str | os.PathLike) -> None:
    """Give ``tmp`` the permissions ``open(path, "w")`` would and rename it over ``path``."""
    os.chmod(tmp, new_file_mode(path))
    os.replace(tmp, path)


def open_new(path: str | os.PathLike, mode: str = "wb") -> IO:
    """Open ``path`` for writing without following a symlink there (the open fails instead)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o666)
    return os.fdopen(fd, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Write ``path`` atomically through a temporary file: yields its name (an empty file created
    exclusively beside ``path``) for the writer to fill; then it replaces ``path``."""
    fd, tmp = temp_beside(path, suffix)
    os.close(fd)
    try:
        yield tmp
        finish_temp(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, mode: str = "wb", suffix: str = ".tmp") -> Iterator[IO]:
    """Like ``atomic_path``, yielding an open handle instead of a name."""
    with atomic_path(path, suffix) as tmp, open_new(tmp, mode) as fh:
        yield fh


# ---------------------------------------------------------------- paths that must not meet

def identity(path: str | os.PathLike) -> tuple:
    """What two paths share when they name the same file: the fully resolved path, and for an
    existing file its device and inode (hard links)."""
    p = Path(path)
    real = os.path.realpath(p)
    try:
        st = os.stat(p)
        return (real, (st.st_dev, st.st_ino))
    except OSError:
        return (real, None)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    ia, ib = identity(a), identity(b)
    return ia[0] == ib[0] or (ia[1] is not None and ia[1] == ib[1])


def colliding(inputs: list[tuple[str, str]], outputs: list[tuple[str, str]]) -> str | None:
    """The first clash among ``(label, path)`` pairs: an output that is an input, or two outputs that
    are one file; a one-line message, or None."""
    for i, (olabel, opath) in enumerate(outputs):
        for ilabel, ipath in inputs:
            if same_file(opath, ipath):
                return f"{olabel} {opath}: is the input {ilabel} {ipath}; choose another path (inputs are never " \
                       "overwritten)"
        for olabel2, opath2 in outputs[:i]:
            if same_file(opath, opath2):
                return f"{olabel} {opath}: the same file as {olabel2} {opath2}; give each output its own path"
    return None


# ---------------------------------------------------------------- external data containment

def contained(base: str | os.PathLike, location: str) -> Path:
    """The file an external-data ``location`` names inside the model folder ``base``, by onnx's rules
    (applied to lazily read weights as well): a relative path, not a symbolic link, and once every link
    and ``..`` is resolved still inside the folder. Raises ValueError saying which rule failed."""
    if not location:
        raise ValueError("an external data location is empty")
    if os.path.isabs(location) or Path(location).drive or location.startswith(("/", "\\")):
        raise ValueError(f"external data location '{location}' is an absolute path")
    root = os.path.realpath(base)
    named = os.path.join(root, location)
    if os.path.islink(named):
        raise ValueError(f"external data location '{location}' is a symbolic link")
    target = os.path.realpath(named)
    if os.path.commonpath([root, target]) != root:
        raise ValueError(f"external data location '{location}' leads outside the model's folder")
    return Path(target)
