"""The op rule table: ``RULES[op_type]`` propagates channel labels through one node.

Adding support for an op is one entry: decorate a function with ``@rule("OpType")``.
An op without an entry is a barrier: every channel it touches is frozen and the
report names the node.
"""

from __future__ import annotations

from typing import Callable

from .base import FIXED, Label, NodeCtx, Unsupported

Rule = Callable[[NodeCtx], None]
RULES: dict[str, Rule] = {}


def rule(*ops: str):
    def register(fn: Rule) -> Rule:
        for op in ops:
            if op in RULES:
                raise ValueError(f"two rules for {op}")
            RULES[op] = fn
        return fn
    return register


# importing the modules fills the table
from . import elementwise, layers, norms, reduce, shape  # noqa: E402,F401

__all__ = ["RULES", "rule", "NodeCtx", "Label", "Unsupported", "FIXED"]
