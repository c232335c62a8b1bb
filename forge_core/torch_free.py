"""Keeping torch out of an MLX process.

An MLX run needs transformers only for tokenizers and chat templates, yet transformers 5 imports torch whenever
it can find it (configuration_utils -> modeling_rope_utils: `if is_torch_available(): import torch`), and mlx_lm
imports transformers at its top. On a machine with both backends that cost an MLX `forge train` ~2.5 s of
imports and ~240 MiB of resident memory for nothing (measured, docs/BENCHMARKS.md "At real sizes").

transformers decides once per process (is_torch_available is an lru_cache over importlib's find_spec), so torch
is hidden only while transformers initialises: it then works without torch for the whole process, and torch
itself stays importable (a GRPO reward or lm-eval may import it). Only a process that runs one forge command
does this (cli.main calls for_this_process): the test suite runs both backends in one process and must not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_ENABLED = False


def for_this_process() -> None:
    global _ENABLED
    _ENABLED = True


def keep_torch_out() -> None:
    """Before the first transformers import of an MLX command: make transformers settle on "no torch"."""
    if not _ENABLED or "torch" in sys.modules or "transformers" in sys.modules:
        return
    # else transformers prints "PyTorch was not found..." - true of this process by design, and no news to the user
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    sys.modules["torch"] = None  # find_spec("torch") answers None while this stands
    try:
        from transformers.utils import is_torch_available

        is_torch_available()  # cached: False, for the rest of the process
    finally:
        del sys.modules["torch"]


def gpu_device_nodes() -> bool:
    """Whether this machine exposes a GPU to user space at all (NVIDIA, WSL's CUDA, ROCm's KFD): without one torch
    cannot see a GPU, so choosing the backend need not import torch (~3 s) to ask."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg", "/dev/kfd"))
