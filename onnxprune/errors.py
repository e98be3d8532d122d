"""The one exception type for problems the user can fix.

Anything raised as :class:`OnnxPruneError` is reported by the CLI as a single
line on stderr with exit code 2. Every other exception is a bug in onnxprune
and keeps its traceback.
"""

from __future__ import annotations


class OnnxPruneError(Exception):
    """A problem with the user's input: a bad path, model, argument or data file.

    The message should say what is wrong and, where possible, what to do next.
    """


class VerificationError(Exception):
    """The pruned model does not match the masked original: a bug, never a warning."""
