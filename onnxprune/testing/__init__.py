"""Helpers for testing onnxprune and models: a small graph builder and a random graph generator."""
