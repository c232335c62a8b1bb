"""Keep freed memory in the process on Linux, so MLX's CPU arrays do not page-fault on every step.

MLX's CPU backend takes each array's buffer from malloc. glibc serves large requests (over 128 KiB at
first, at most 32 MiB) with a fresh mmap and gives it back on free, so every activation of a training
step lands on new pages that the kernel must fault in and zero: an elementwise op on a 50 MB array
costs several times more than on reused memory (docs/BENCHMARKS.md, "MLX CPU kernels"). Two mallopt settings
keep freed blocks in the heap for reuse: no mmap for large blocks (M_MMAP_MAX = 0) and no trimming of
the heap top (M_TRIM_THRESHOLD). The cost: the process keeps its peak footprint until it exits, which
a training run reaches anyway. glibc only; elsewhere (macOS, musl) nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once (FORGE_NO_MALLOC_TUNING=1 skips); True when glibc accepted them."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or os.environ.get("FORGE_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
