"""Test graphs are built with the package's own builder (also used by tools/fuzz.py)."""

from onnxprune.testing.builder import GraphBuilder  # noqa: F401
