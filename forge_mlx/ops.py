"""forge_mlx as forge_core sees it: the BackendOps Protocol (forge_core/backend.py) in MLX.

The loop, objectives and eval are forge_core's; this module gathers the framework pieces they call.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import cpu_math
from .blas import warn_if_slow as preflight  # noqa: F401
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
    load_adapter_dir,
    load_base,
    save_adapter,
)
from .packing import enable_packing  # noqa: F401
from .step import make_stepper  # noqa: F401

name = "mlx"
xp = mx


def seed(n: int) -> None:
    mx.random.seed(n)


def to_batch(model, batch: dict) -> dict:
    return {k: mx.array(v) for k, v in batch.items()}


def to_numpy(x) -> np.ndarray:
    return np.array(x)


def scalar(value: float, like=None) -> mx.array:
    return mx.array(value, dtype=mx.float32)


def stop_gradient(x) -> mx.array:
    return mx.stop_gradient(x)


def adapter_state(model) -> dict:
    """A copy of the trainable (adapter) weights as numpy, for set_adapter_state."""
    return {k: np.array(v) for k, v in trainable_params(model).items()}


def set_adapter_state(model, state: dict) -> None:
    load_trainable(model, {k: mx.array(v) for k, v in state.items()})


def no_grad(model, fn, compiled: bool = True):
    """MLX computes no gradient unless asked. Compiling with the model's state as input makes evals that
    come back (the loop's) one cached graph per batch shape; a one-off pass over many shapes (forge eval)
    is faster eager, as compiling each shape costs about what running it once saves."""
    return mx.compile(fn, inputs=[model.state]) if compiled else fn


def peak_memory() -> int:
    return int(mx.get_peak_memory())


def guard_peak() -> int | None:
    return int(mx.get_peak_memory())


def set_memory_limit(nbytes: int) -> None:
    """The memory plan's budget as MLX's allocator limit (a guideline: MLX frees its cache to stay under it).
    The loop's MemoryGuard is what stops a run whose measured peak passes it."""
    mx.set_memory_limit(int(nbytes))


def describe(model) -> str:
    return ""


def hf_tokenizer(tokenizer):
    """mlx-lm's TokenizerWrapper holds the transformers tokenizer."""
    return getattr(tokenizer, "_tokenizer", tokenizer)


def load_base_for_inference(cfg) -> tuple:
    model, tokenizer, _ = load_base(cfg.model.path, compute_dtype(cfg), quantized_ok=True)
    cpu_math.install(model, cfg.model.fast_cpu_math)
    return model, tokenizer
