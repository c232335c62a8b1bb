"""forge_cuda as forge_core sees it: the BackendOps Protocol (forge_core/backend.py) in PyTorch.

The loop, objectives and eval are forge_core's; this module gathers the framework pieces they call.
"""

from __future__ import annotations

import resource

import numpy as np
import torch

from .distributed import all_sum, init_world, reduce_numpy  # noqa: F401
from .generate import complete, for_inference, generate_tokens, sampling_weights  # noqa: F401
from .lora import factors_to_flat, flat_to_factors, load_trainable, trainable_params  # noqa: F401
from .losses import (  # noqa: F401
    continuation_scores,
    per_token_logps,
    prefix_state,
    sequence_logps,
    sft_loss,
    sft_loss_after,
)
from .model import (  # noqa: F401
    build_model,
    checkpoint_blocks,
    compute_dtype,
    count_params,
    device,
    load_adapter_dir,
    load_base,
    save_adapter,
)
from .packing import enable_packing  # noqa: F401
from .step import make_stepper  # noqa: F401

name = "cuda"
xp = torch


def seed(n: int) -> None:
    torch.manual_seed(n)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def to_batch(model, batch: dict) -> dict:
    dev = _device(model)
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in batch.items()}


def to_numpy(x) -> np.ndarray:
    x = x.detach()
    return (x.float() if x.is_floating_point() else x).cpu().numpy()


def scalar(value: float, like) -> torch.Tensor:
    return torch.tensor(float(value), device=like.device)


def stop_gradient(x) -> torch.Tensor:
    return x.detach()


def adapter_state(model) -> dict:
    """A copy of the trainable (adapter) weights as numpy, for set_adapter_state."""
    return {k: p.detach().float().cpu().numpy().copy() for k, p in trainable_params(model).items()}


def set_adapter_state(model, state: dict) -> None:
    load_trainable(model, state)


def no_grad(model, fn, compiled: bool = True):
    return torch.no_grad()(fn)


def peak_memory() -> int:
    """Peak bytes: the CUDA allocator's peak on a GPU, the process's peak RSS on the CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def guard_peak() -> int | None:
    """The CUDA allocator's peak; None on the CPU, where the process's max RSS counts the interpreter and
    libraries too and never comes down (no reliable peak)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def set_memory_limit(nbytes: int) -> None:
    """The memory plan's budget as the CUDA caching allocator's cap: past `nbytes` torch raises
    OutOfMemoryError (which the loop turns into a clean stop) instead of thrashing the machine.
    The CPU has no such allocator knob: no-op."""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, max(int(nbytes), 1) / total))


def describe(model) -> str:
    return f" on {_device(model)}"


def preflight(console) -> None:
    """Nothing to warn about: torch brings its own BLAS."""


def hf_tokenizer(tokenizer):
    return tokenizer


def load_base_for_inference(cfg) -> tuple:
    model, tokenizer, _ = load_base(cfg.model.path, compute_dtype(cfg))
    return model.to(device()), tokenizer
