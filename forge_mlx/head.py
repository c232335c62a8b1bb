"""The output head kept apart from the body, so the loss can run it only where tokens are trained.

A llama-style mlx-lm model computes logits = head(model.model(inputs)): the vocabulary matmul and the
log-softmax over V (49152 for SmolLM2) at every position. With the prompt masked out of the loss only
the assistant tokens need them (about a third of the demo data), so the SFT loss gathers those
positions' hidden states first (`loss_positions` from forge_core.data.add_loss_positions) and runs
the head on them alone: same loss and gradients, a fraction of the head's work and memory.
Architectures whose __call__ does more than that (logit soft-capping, scaled embeddings) use the
plain full-logits path.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import cpu_math
from .packing import SUPPORTED, packed_hidden


def splittable(model: nn.Module) -> bool:
    return getattr(model, "model_type", None) in SUPPORTED and hasattr(model, "model")


def hidden(model: nn.Module, inputs: mx.array, batch: dict | None = None) -> mx.array:
    """Final-norm hidden states (B, T, D); packed batches keep attention inside each row."""
    if batch is not None and "segment_ids" in batch:
        return packed_hidden(model, inputs, batch["segment_ids"], batch["position_ids"])
    return model.model(inputs)


def logits(model: nn.Module, h: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def position_nll(model: nn.Module, h: mx.array, batch: dict) -> mx.array:
    """-log p(target) at batch["loss_positions"] only: h (B, T, D) hidden states -> (N,), float32."""
    pos = batch["loss_positions"]
    return token_nll(logits(model, h.reshape(-1, h.shape[-1])[pos]), batch["targets"].reshape(-1)[pos])


def token_nll(logits_: mx.array, targets: mx.array) -> mx.array:
    """-log p(target) per position, float32; forge's exp kernels on the CPU (cpu_math.py)."""
    if cpu_math.active():
        return cpu_math.nll(logits_, targets)
    return nn.losses.cross_entropy(logits_.astype(mx.float32), targets, reduction="none")
