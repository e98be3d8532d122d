"""Choosing how much to prune: budgets, latency-aware allocation, per-group sensitivity."""
