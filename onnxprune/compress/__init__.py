"""Compression besides structured pruning: unstructured and N:M sparsity, weight sharing."""
