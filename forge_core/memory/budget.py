"""How much memory a run may use: the device budget, and sizes as people write them ("24GB").

Frameworks are imported only inside the function that asks them, and only when that backend on that
machine is the one being planned: planning a CUDA run on a laptop with --device-memory imports no torch.
"""

from __future__ import annotations

import platform
import re

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

# Memory is sold in binary units: a "24GB" Mac or GPU holds 24 GiB. So GB = GiB = 2**30 here.
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """'24GB', '16 GiB', '512MB', '1.5g', '1073741824' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m or (m.group(3) and m.group(3).lower() == "ib" and not m.group(2)):
        raise ForgeError(f"memory.device_memory: '{text}' is not a size; write it like 24GB, 16GiB or 512MB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ForgeError(f"memory.device_memory: '{text}' must be more than zero")
    return n


def human(n: float) -> str:
    """Bytes in binary units: '5.62 GiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def is_metal(backend: str) -> bool:
    return backend == "mlx" and platform.system() == "Darwin" and platform.machine() == "arm64"


def _torch_gpu():
    """torch.cuda if torch is installed and sees a GPU, else None (imports torch: CUDA planning only)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def plans_for_gpu(backend: str, cfg: ForgeConfig) -> bool:
    """Is the planned device a GPU (Metal / CUDA)? --device-memory plans for another machine's GPU."""
    if cfg.memory.device_memory:
        return True
    if backend == "mlx":
        return is_metal(backend)
    return _torch_gpu() is not None


def _metal_working_set() -> int:
    import mlx.core as mx

    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    return int(info["max_recommended_working_set_size"])


def _available_ram() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def device_budget(backend: str, cfg: ForgeConfig) -> tuple[int, str]:
    """(bytes the run may use, where that number came from).

    memory.device_memory wins; else Metal: MLX's recommended working set; CUDA: free device memory
    (torch.cuda.mem_get_info); CPU (MLX on Linux, torch without a GPU): available RAM.
    """
    if cfg.memory.device_memory:
        return parse_size(cfg.memory.device_memory), f"memory.device_memory = {cfg.memory.device_memory}"
    if is_metal(backend):
        return _metal_working_set(), "MLX recommended working set (Metal)"
    if backend == "cuda":
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            raise ForgeError("planning a CUDA run on a machine without torch: pass --device-memory "
                             "(e.g. --device-memory 24GB) for the target GPU")
        cuda = _torch_gpu()
        if cuda is not None:
            free, _ = cuda.mem_get_info()
            return int(free), f"free memory on {cuda.get_device_name()}"
        return _available_ram(), "available RAM (torch sees no GPU)"
    return _available_ram(), "available RAM"
