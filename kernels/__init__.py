"""Triton kernels (installed as ``megagpt.kernels``): one file an op, each with its reference."""
