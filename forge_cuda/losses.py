"""Losses as small pure functions of (model, batch), mirroring forge_mlx.losses. The loop takes one as an argument.

Batches are the numpy dicts of forge_core.data (inputs, targets, mask (B, T)) as torch tensors on the
model's device. No attention mask is passed for plain batches: rows are right-padded and attention is
causal, so padding never reaches a scored position (the same convention as forge_mlx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forge_core.preference import dpo_objective, dpo_terms  # noqa: F401  (the formulas live in one place)


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
    """log p(target_t | inputs_<=t) for every position: (B, T), fp32. Packed batches (segment_ids,
    position_ids) run with attention kept inside each row (packing.py)."""
    if batch is not None and "segment_ids" in batch:
        from .packing import packed_logits

        logits = packed_logits(model, inputs, batch["segment_ids"], batch["position_ids"])
    else:
        logits = model(input_ids=inputs, use_cache=False).logits
    logits = logits.float()  # (B, T, V)
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T).long(), reduction="none")
    return -nll.view(B, T)


def sft_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token NLL over masked (assistant) tokens, and the token count.

    The loop divides by the total token count of the whole (accumulated) batch, so gradient
    accumulation gives exactly the gradient of the token-mean over the full batch.
    """
    logp = token_logps(model, batch["inputs"], batch["targets"], batch)
    mask = batch["mask"]
    return -(logp * mask).sum(), mask.sum()


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence: (2B,) for a concatenated chosen+rejected batch."""
    logp = token_logps(model, batch["inputs"], batch["targets"])
    return (logp * batch["mask"]).sum(dim=-1)


def dpo_loss(model, batch, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             sft_weight: float = 0.0):
    """DPO family on ONE concatenated forward: rows [0, B) are chosen, [B, 2B) rejected.

    batch["ref_logps"] (2B,) holds the reference model's sequence log-probs, precomputed before
    training. Returns (sum of per-pair losses, number of pairs, metrics dict of sums).
    """
    logps = sequence_logps(model, batch)
    losses, metrics = dpo_objective(torch, logps, batch["ref_logps"], batch["mask"].sum(dim=-1), beta, loss_type,
                                    label_smoothing, sft_weight)
    metrics = {k: v.detach() for k, v in metrics.items()}
    return losses.sum(), torch.tensor(float(logps.shape[0] // 2), device=logps.device), metrics
