"""Measurement: quality (accuracy, fidelity), params and MACs, latency, and plots of them."""
