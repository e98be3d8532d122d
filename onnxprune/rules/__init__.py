"""The op rule table: ``RULES[op_type]`` propagates channel labels through one node.

Adding support for an op is one entry: decorate a function with ``@rule("OpType")``.
An op without an entry is a barrier: every channel it touches is frozen and the
report names the node.
"""

from __future__ import annotations

from typing import Callable

from .base import FIXED, Label, NodeCtx, Unsupported

Rule = Callable[[NodeCtx], None]
RULES: dict[str, Rule] = {}            # ops of the default ONNX domain
DOMAIN_RULES: dict[str, dict[str, Rule]] = {"com.microsoft": {}}   # onnxruntime's contrib ops (contrib.py)
DEFAULT_DOMAINS = ("", "ai.onnx", None)


def rule(*ops: str, domain: str = ""):
    table = RULES if domain in DEFAULT_DOMAINS else DOMAIN_RULES.setdefault(domain, {})

    def register(fn: Rule) -> Rule:
        for op in ops:
            if op in table:
                raise ValueError(f"two rules for {op}")
            table[op] = fn
        return fn
    return register


def lookup(domain: str | None, op: str) -> Rule | None:
    """The rule for ``op`` of ``domain``, or None (a barrier)."""
    table = RULES if domain in DEFAULT_DOMAINS else DOMAIN_RULES.get(domain, {})
    return table.get(op)


# importing the modules fills the table
from . import contrib, elementwise, layers, norms, reduce, shape  # noqa: E402,F401

__all__ = ["RULES", "DOMAIN_RULES", "lookup", "rule", "NodeCtx", "Label", "Unsupported", "FIXED"]
