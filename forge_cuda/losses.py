"""Tensor losses as small pure functions of (model, batch); forge_core's objectives build on them.

Batches are the numpy dicts of forge_core.data (inputs, targets, mask (B, T)) as torch tensors on the
model's device. No attention mask is passed for plain batches: rows are right-padded and attention is
causal, so padding never reaches a scored position (the same convention as forge_mlx).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import head
from .packing import enable_packing, segment_mask


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor, batch: dict | None = None,
                temperature: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """log p(target_t | inputs_<=t): (B, T), fp32. Packed batches (segment_ids, position_ids) run with attention
    kept inside each row (packing.py). With `mask`, where the model splits (head.py) the head runs at the masked
    positions only, a chunk of them at a time, and the other positions are 0; otherwise every position is
    computed."""
    kwargs = {}
    if batch is not None and "segment_ids" in batch:  # a 4D block-diagonal mask and per-row positions
        enable_packing(model)
        dtype = model.get_input_embeddings().weight.dtype
        kwargs = {"attention_mask": segment_mask(batch["segment_ids"], dtype),
                  "position_ids": batch["position_ids"].long()}
    w = head.head_weight(model) if mask is not None else None
    if w is not None:
        hs, ts, where = head.at_mask(head.hidden(model, inputs, **kwargs), targets, mask)
        scale = (1.0 / temperature if temperature is not None else torch.ones(())).float().reshape(()).to(hs.device)
        nll = head.chunked_nll(hs, w, ts, scale)
        return torch.zeros(inputs.numel(), dtype=torch.float32, device=hs.device).index_put(
            (where,), -nll).view(inputs.shape)
    logits = model(input_ids=inputs, use_cache=False, **kwargs).logits.float()  # (B, T, V)
    if temperature is not None:
        logits = logits / temperature
    B, T, V = logits.shape
    nll = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T).long(), reduction="none")
    return -nll.view(B, T)


def sft_loss(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token NLL over masked (assistant) tokens, and the token count.

    The loop divides by the total token count of the whole (accumulated) batch, so gradient
    accumulation gives exactly the gradient of the token-mean over the full batch.
    """
    mask = batch["mask"]
    logp = token_logps(model, batch["inputs"], batch["targets"], batch, mask=mask)
    return -(logp * mask).sum(), mask.sum()


def sequence_logps(model, batch) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence: (2B,) for a concatenated chosen+rejected batch."""
    logp = token_logps(model, batch["inputs"], batch["targets"], mask=batch["mask"])
    return (logp * batch["mask"]).sum(dim=-1)


def per_token_logps(model, batch) -> torch.Tensor:
    """(B, T) log-probs of the targets, 0 where the mask is 0 (GRPO's per-token ratios), of the logits divided by
    batch["temperature"] when given (the distribution the completions were sampled from, as TRL scores them)."""
    return token_logps(model, batch["inputs"], batch["targets"], temperature=batch.get("temperature"),
                       mask=batch["mask"]) * batch["mask"]


@torch.no_grad()
def continuation_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the masked targets, and whether each of them is the model's argmax
    (lm-eval's loglikelihood and is_greedy). Where the model splits (head.py) the head runs at the masked positions
    only, a chunk at a time."""
    targets, mask = batch["targets"].long(), batch["mask"]
    w = head.head_weight(model)
    if w is not None:
        hs, ts, where = head.at_mask(head.hidden(model, batch["inputs"]), targets, mask)
        logp, top = head.chunked_scores(hs, w, ts)
        rows = where // mask.shape[1]
        sums = torch.zeros(mask.shape[0], dtype=torch.float32, device=hs.device).index_add_(
            0, rows, logp * mask.reshape(-1)[where].float())
        greedy = torch.ones(mask.shape[0], dtype=torch.bool, device=hs.device).index_fill_(0, rows[~top], False)
        return sums, greedy
    logits = model(input_ids=batch["inputs"], use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    greedy = ((logits.argmax(dim=-1) == targets) | (mask == 0)).all(dim=-1)
    return (logp * mask).sum(dim=-1), greedy


def prefix_state(model, ids: list[int]):
    """No shared-prefix cache on this backend yet: forge_core then runs whole rows (the same loss)."""


def sft_loss_after(model, batch, prefix):
    raise NotImplementedError("prefix_state returns None on this backend")
