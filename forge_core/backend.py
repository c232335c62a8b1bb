"""Which backend runs a command, chosen lazily so `forge --help` imports no framework.

Both backends expose the same functions (checked by tests/test_backend_contract.py):
    trainer.train(cfg, kind="sft"|"dpo", resume=None) -> run dir
    generate.generate(cfg, adapter, prompt, ...) -> text (streams to stdout)
    generate.evaluate(cfg, adapter, data) -> metrics dict
    export.merged_weights / export.load_adapter ...
"""

from __future__ import annotations

import importlib
import importlib.util
import platform

from forge_core.errors import ForgeError

BACKENDS = ("mlx", "cuda")
_PACKAGES = {"mlx": "forge_mlx", "cuda": "forge_cuda"}
_FRAMEWORK = {"mlx": "mlx", "cuda": "torch"}
_INSTALL = {"mlx": 'pip install "forge-tune[mlx]"  (Linux: "forge-tune[mlx-linux]")', "cuda": 'pip install "forge-tune[cuda]"'}


def installed(name: str) -> bool:
    return importlib.util.find_spec(_FRAMEWORK[name]) is not None


def is_apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _torch_sees_gpu() -> bool:
    if not installed("cuda"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def resolve(name: str = "auto") -> str:
    """auto: MLX on Apple Silicon or when only mlx is installed; CUDA when torch sees a GPU; else MLX on CPU."""
    if name in BACKENDS:
        if not installed(name):
            raise ForgeError(f"backend '{name}' needs {_FRAMEWORK[name]}: {_INSTALL[name]}")
        return name
    if name != "auto":
        raise ForgeError(f"--backend '{name}': choose auto, mlx or cuda")
    has_mlx, has_torch = installed("mlx"), installed("cuda")
    if is_apple_silicon() and has_mlx:
        return "mlx"
    if has_mlx and not has_torch:
        return "mlx"
    if has_torch and _torch_sees_gpu():
        return "cuda"
    if has_mlx:
        return "mlx"
    if has_torch:
        return "cuda"
    raise ForgeError(f"no backend installed: {_INSTALL['mlx']} or {_INSTALL['cuda']}")


def module(name: str, part: str):
    """forge_<backend>.<part>, e.g. module('mlx', 'trainer')."""
    return importlib.import_module(f"{_PACKAGES[name]}.{part}")
