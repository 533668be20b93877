"""Operator families; each folder declares its ops once and holds every backend's kernels."""
