"""Give MLX's CPU backend a fast BLAS on Linux, before `mlx.core` is imported.

The `mlx[cpu]` Linux wheel links netlib's reference BLAS: an fp32 512x576 @ 576x1536 matmul takes
~450 ms there against ~5 ms with OpenBLAS (docs/BENCHMARKS.md). MLX resolves `sgemm_`/`cblas_sgemm`
through the dynamic linker, so loading an optimized BLAS with RTLD_GLOBAL *before* MLX's own
libraries are loaded makes MLX use it. This must run before the first `import mlx.core`; forge_mlx's
package __init__ calls it. Nothing depends on it: when no optimized BLAS is found MLX still works,
slower, and `forge` says so once.

Sources, in order: $FORGE_BLAS (a path), Debian's libopenblas0-pthread, PyPI's cmeel-openblas (needs
libgfortran.so.5 on the system). scipy-openblas32 does not work: its symbols are prefixed.
"""

from __future__ import annotations

import ctypes
import glob
import os
import platform
import site
import sys

_loaded: str | None = None
_reason: str = ""

DEBIAN = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
]


def _candidates() -> list[str]:
    paths = []
    if os.environ.get("FORGE_BLAS"):
        paths.append(os.environ["FORGE_BLAS"])
    paths += DEBIAN
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()] + [p for p in sys.path if "site-packages" in p]
    for d in dict.fromkeys(dirs):
        paths += sorted(glob.glob(os.path.join(d, "cmeel.prefix", "lib", "libopenblas.so.0")))
    return paths


def preload() -> str | None:
    """Load an optimized BLAS globally if we are on Linux and mlx.core is not imported yet."""
    global _loaded, _reason
    if _loaded or platform.system() != "Linux" or os.environ.get("FORGE_NO_BLAS_PRELOAD"):
        _reason = _reason or "not Linux or disabled"
        return _loaded
    if "mlx.core" in sys.modules:
        _reason = "mlx.core was imported before forge_mlx; import forge_mlx first"
        return None
    share_cores_with_local_ranks()
    errors = []
    for path in _candidates():
        if not os.path.exists(path):
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:  # e.g. cmeel-openblas without libgfortran5
            errors.append(f"{path}: {e}")
            continue
        _loaded = path
        return path
    _reason = "; ".join(errors) or "no optimized BLAS found (apt-get install libopenblas0-pthread, or pip install cmeel-openblas)"
    return None


def share_cores_with_local_ranks() -> None:
    """Under a launcher (`mlx.launch -n 2 -- forge ...`) every rank on this machine would start a BLAS pool of all
    its cores, and the pools' spinning threads fight over them (the README's mlx.launch line ran 2.5x slower than
    `forge train --nproc 2`, which sets this for its ranks): unless the user set it, each rank takes its share.
    OpenBLAS reads OPENBLAS_NUM_THREADS when it loads, so this runs before the preload."""
    if "OPENBLAS_NUM_THREADS" in os.environ or not os.environ.get("MLX_RANK"):
        return
    from forge_core.distributed import local_ranks

    os.environ["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, local_ranks())))


def status() -> tuple[str | None, str]:
    """(path of the preloaded BLAS or None, why not)."""
    return _loaded, _reason


def warn_if_slow(console) -> None:
    """One line when MLX runs on Linux with its reference BLAS (fp32 matmul ~90x slower)."""
    if platform.system() == "Linux" and _loaded is None and not os.environ.get("FORGE_NO_BLAS_PRELOAD"):
        console.print(f"[yellow]note: MLX is using its reference BLAS - training will be slow ({_reason})")
