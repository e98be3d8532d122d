"""Terminal output: tables to stdout, progress and hints to stderr."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import OnnxPruneError
from ..ir import safety

out = Console(highlight=False, soft_wrap=False, width=max(100, Console().width))
err = Console(stderr=True, highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]],
          right: Sequence[int] = ()) -> None:
    t = Table(title=title, title_justify="left", show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        t.add_column(c, justify="right" if i in right else "left", overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    out.print(t)


def progress(iterable, total: int | None = None, description: str = "working"):
    """Wrap an iterable with a progress bar on stderr; when stderr is not a terminal (a log, CI), one line every
    ``ONNXPRUNE_PROGRESS_EVERY`` seconds (default 30) instead. ``ONNXPRUNE_NO_PROGRESS=1`` silences both."""
    if os.environ.get("ONNXPRUNE_NO_PROGRESS"):
        yield from iterable
        return
    if not sys.stderr.isatty():
        every = float(os.environ.get("ONNXPRUNE_PROGRESS_EVERY", "30"))
        start = last = time.monotonic()
        for i, item in enumerate(iterable, 1):
            yield item
            now = time.monotonic()
            if now - last >= every:
                last = now
                print(f"{description}: {i}{f' of {total}' if total else ''} done, {now - start:.0f} s",
                      file=sys.stderr, flush=True)
        return
    cols = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*cols, console=err, transient=True) as p:
        task = p.add_task(description, total=total)
        for item in iterable:
            yield item
            p.advance(task)


def human_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() else f"{n:.3g}"


def human_bytes(n: float) -> str:
    for unit, div in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def write_json(path: str | os.PathLike, data: object) -> None:
    """Write JSON atomically (``-``: to standard output)."""
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically, with the permissions ``open(path, "w")`` gives (``-``: standard output)."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    p = Path(path)
    try:
        with safety.atomic_output(p, "w") as fh:
            fh.write(text)
    except OSError as e:
        raise OnnxPruneError(f"{p}: cannot write there ({e.strerror or e}); choose another folder") from None


def _jsonable(o):
    import numpy as np
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def skipped(rows: list[dict]) -> None:
    """The weights a compression left alone, and why."""
    if rows:
        table("skipped", ["layer", "tensor", "reason"], [[s["name"], s["tensor"], s["reason"]] for s in rows])


def compression_totals(r: dict) -> None:
    """Sizes before/after (on disk and compressed), accuracy and fidelity of a compressed model's report."""
    rows = [["file size", human_bytes(r["file_bytes_before"]), human_bytes(r["file_bytes_after"])],
            [f"compressed ({r['compression']})", human_bytes(r["compressed_bytes_before"]),
             human_bytes(r["compressed_bytes_after"])]]
    if r["accuracy"]:
        rows.append(["top-1 accuracy", f"{r['reference_accuracy']['top1']:.2%}", f"{r['accuracy']['top1']:.2%}"])
    table(None, ["", "before", "after"], rows, right=(1, 2))
    for name, f in (r["fidelity"] or {}).items():
        agree = "" if f["top1_agreement"] is None else f", top-1 agreement {f['top1_agreement']:.2%}"
        out.print(f"fidelity of '{name}' on {r['data']}: rel error {f['rel_error']:.4g}, "
                  f"cosine {f['cosine']:.6f}{agree}", soft_wrap=True)


def log(line: str) -> None:
    """A progress line on stderr (training logs)."""
    print(line, file=sys.stderr)

