"""The one exception type for problems the user can fix.

Anything raised as :class:`OnnxPruneError` is reported by the CLI as a single
line on stderr with exit code 2. Every other exception is a bug in onnxprune
and keeps its traceback.
"""

from __future__ import annotations

import difflib
import functools
import re
from typing import Iterable


class OnnxPruneError(Exception):
    """A problem with the user's input: a bad path, model, argument or data file.

    The message should say what is wrong and, where possible, what to do next.
    """


class VerificationError(Exception):
    """The pruned model does not match the masked original: a bug, never a warning."""


def unknown_name(what: str, name: str, known: Iterable[str]) -> OnnxPruneError:
    """The error for a layer or weight name the model does not have, with the closest names it does have."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else \
        "; list the layers with 'onnxprune inspect MODEL'"
    return OnnxPruneError(f"{what} '{name}' names no layer or weight of this model{hint}")


_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(=| (?=[-\d'\"A-Z.]))?")


def in_python_terms(message: str) -> str:
    """A message written for the command line, for Python callers: ``--calib DATA`` reads ``calib=DATA``,
    ``--round-to 3`` reads ``round_to=3`` (the keyword or Policy field of the same name)."""
    return _FLAG.sub(lambda m: m.group(1).replace("-", "_") + ("=" if m.group(2) else ""), message)


def python_api(fn):
    """Wrap a public function so that its :class:`OnnxPruneError` messages name parameters, not CLI flags."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OnnxPruneError as e:
            text = str(e)
            python = in_python_terms(text)
            if python == text:
                raise
            raise OnnxPruneError(python) from None
    return call
