"""Triton kernels for the block-sparse rank-activation op, installed as `moelora.kernels`.

The folder lives at the repository root (DESIGN §3) but is only ever imported through the package:
the top-level name `kernels` belongs to another project on PyPI.
"""
