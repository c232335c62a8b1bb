"""Forge on MLX: QPiSSA + LoRA SFT and DPO written in MLX arrays.

Importing this package first loads an optimized BLAS for MLX's CPU backend on Linux (see blas.py):
it has to happen before `mlx.core` is imported anywhere in the process.
"""

from . import blas as _blas

_blas.preload()
