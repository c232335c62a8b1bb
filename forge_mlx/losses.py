"""Tensor losses as small pure functions of (model, batch); forge_core's objectives build on them.

Batches are the numpy dicts of forge_core.data (inputs, targets, mask (B, T)), converted to mx arrays.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from . import head


def token_logps(model, inputs: mx.array, targets: mx.array, batch: dict | None = None) -> mx.array:
    """log p(target_t | inputs_<=t) for every position: (B, T), fp32. Packed batches (segment_ids,
    position_ids) run with attention kept inside each row (packing.py)."""
    if head.splittable(model):
        out = head.logits(model, head.hidden(model, inputs, batch))
    else:  # packing is refused for these architectures (architectures.py: packing), so no segment_ids here
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


def per_token_logps(model, batch) -> mx.array:
    """(B, T) log-probs of the targets, 0 where the mask is 0 (GRPO's per-token ratios), of the logits divided by
    batch["temperature"] when given (the distribution the completions were sampled from, as TRL scores them). With
    `loss_positions` the head runs at the completion tokens only and their values are put back in place."""
    scale = 1.0 / batch["temperature"] if "temperature" in batch else None
    if "loss_positions" in batch and head.splittable(model):
        h = head.hidden(model, batch["inputs"])
        rows, width = h.shape[0], h.shape[1]
        pos = batch["loss_positions"]
        nll = head.position_nll(model, h, batch, scale)
        flat = mx.zeros((rows * width,), mx.float32).at[pos].add(-nll * batch["loss_weights"])
        return flat.reshape(rows, width)
    logits = model(batch["inputs"])
    if scale is not None:
        logits = logits.astype(mx.float32) * scale
    return -head.token_nll(logits, batch["targets"]) * batch["mask"]


def continuation_scores(model, batch) -> tuple[mx.array, mx.array]:
    """Per row: the summed log-prob of the masked targets, and whether each of them is the model's argmax
    (lm-eval's loglikelihood and is_greedy)."""
    if head.splittable(model):
        logits = head.logits(model, head.hidden(model, batch["inputs"]))
    else:
        logits = model(batch["inputs"])
    logits = logits.astype(mx.float32)
    logp = -head.token_nll(logits, batch["targets"])
    mask = batch["mask"]
    greedy = ((mx.argmax(logits, axis=-1) == batch["targets"]) | (mask == 0)).all(axis=-1)
    return (logp * mask).sum(axis=-1), greedy


def prefix_state(model, ids: list[int]):
    """The KV cache of `ids` (one row) run through the body once, for sft_loss_after; None where the head is
    not kept apart (head.splittable) and the loss cannot continue from a cache."""
    if not head.splittable(model):
        return None
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model.model(mx.array(np.asarray(ids, np.int32)[None]), cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def sft_loss_after(model, batch, prefix) -> tuple[mx.array, mx.array]:
    """sft_loss of rows that all start with the prefix of `prefix` (prefix_state), given without it: the body
    runs on the rest only, attending to the prefix's cached keys and values. Needs loss_positions."""
    from mlx_lm.models.cache import KVCache

    rows, cache = batch["inputs"].shape[0], []
    for c in prefix:
        k, v = c.keys_and_values()
        layer = KVCache()
        layer.state = (mx.repeat(k, rows, axis=0), mx.repeat(v, rows, axis=0), k.shape[2])
        cache.append(layer)
    nll = head.position_nll(model, model.model(batch["inputs"], cache=cache), batch)
    return (nll * batch["loss_weights"]).sum(), batch["mask"].sum()
