"""Forge on MLX: QPiSSA + LoRA SFT and DPO written in MLX arrays.

Importing this package first loads an optimized BLAS for MLX's CPU backend on Linux (see blas.py):
it has to happen before `mlx.core` is imported anywhere in the process. It also tells glibc to keep
freed memory for reuse (allocator.py), which makes MLX's CPU ops on large arrays several times faster.
"""

from . import allocator as _allocator
from . import blas as _blas

_blas.preload()
_allocator.keep_freed_memory()
