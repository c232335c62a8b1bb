"""Tensor losses as small pure functions of (model, batch); forge_core's objectives build on them.

Batches are the numpy dicts of forge_core.data (inputs, targets, mask (B, T)), converted to mx arrays.
"""

from __future__ import annotations

import mlx.core as mx

from . import head


def token_logps(model, inputs: mx.array, targets: mx.array, batch: dict | None = None) -> mx.array:
    """log p(target_t | inputs_<=t) for every position: (B, T), fp32. Packed batches (segment_ids,
    position_ids) run with attention kept inside each row (packing.py)."""
    if head.splittable(model):
        out = head.logits(model, head.hidden(model, inputs, batch))
    else:  # packing is refused for these architectures (packing.SUPPORTED), so no segment_ids here
        out = model(inputs)
    return -head.token_nll(out, targets)  # (B, T)


def sft_loss(model, batch) -> tuple[mx.array, mx.array]:
    """Sum of token NLL over masked (assistant) tokens, and the token count.

    The loop divides by the total token count of the whole (accumulated) batch, so gradient
    accumulation gives exactly the gradient of the token-mean over the full batch. With
    `loss_positions` in the batch the vocabulary head runs at those positions only (head.py).
    """
    if "loss_positions" in batch and head.splittable(model):
        nll = head.position_nll(model, head.hidden(model, batch["inputs"], batch), batch)  # padding: weight 0
        return (nll * batch["loss_weights"]).sum(), batch["mask"].sum()
    logp = token_logps(model, batch["inputs"], batch["targets"], batch)
    mask = batch["mask"]
    return -(logp * mask).sum(), mask.sum()


def sequence_logps(model, batch) -> mx.array:
    """Sum of completion-token log-probs per sequence: (2B,) for a concatenated chosen+rejected batch.
    With `loss_positions` the head runs at the completion tokens only and each row sums its own."""
    if "loss_positions" in batch and head.splittable(model):
        h = head.hidden(model, batch["inputs"])
        rows, width = h.shape[0], h.shape[1]
        nll = head.position_nll(model, h, batch)
        return mx.zeros((rows,), mx.float32).at[batch["loss_positions"] // width].add(-nll * batch["loss_weights"])
    logp = token_logps(model, batch["inputs"], batch["targets"])
    return (logp * batch["mask"]).sum(axis=-1)
