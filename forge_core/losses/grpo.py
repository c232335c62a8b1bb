"""GRPO (Shao et al. 2024) and its DAPO / Dr. GRPO / BNPO variants, for any array module (numpy, mlx.core, torch).

TRL 1.16 trl/trainer/grpo_trainer.py, transcribed (TRL computes these inside its trainer, on a model's outputs):
  advantages   G completions per prompt; rewards summed over the reward functions with their weights (a reward
               None for every function: unscorable, NaN); A = r − mean of its group, divided by (std + 1e-4) of
               the group ("group", the paper) or of the whole batch ("batch") unless "none" (Dr. GRPO); NaN → 0.
               std is Bessel-corrected, NaNs left out (TRL's nanstd).
  per token    w = exp(log π − log π_old) (token level; "sequence": the row's mean log-ratio, GSPO)
               loss_t = −min(w·A, clip(w, 1 − ε_low, 1 + ε_high)·A)   [+ β·KL_t,  KL_t = e^{r−l} − (r−l) − 1
               with r = log π_ref, l = log π: the k3 estimator]; `delta` caps w from above (two-sided clipping)
  reduction    what the loss is a mean of, as forge's loop takes it: (sum, count), divided once per step
               grpo     Σ_rows (token mean of the row)          / rows
               bnpo     Σ masked tokens                          / masked tokens
               dapo     Σ masked tokens                          / masked tokens (of the whole step, as TRL's
                                                                   num_items_in_batch)
               dr_grpo  Σ masked tokens                          / (rows × max_completion_length)
  TRL divides grpo, bnpo and dr_grpo per micro-batch and then by the accumulation steps; forge divides the
  step's sums once, which is the same with one micro-batch per step (and for bnpo = dapo always).
"""

from __future__ import annotations

import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
# sums grpo_terms returns for the metrics (divided by the masked token count, except where noted)
METRICS = ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")


def _nanstd(x: np.ndarray, axis=None) -> np.ndarray:
    return np.sqrt(np.nanvar(x, axis=axis, ddof=1))


def group_advantages(rewards: np.ndarray, group: int, scale: str = "group") -> np.ndarray:
    """(N,) advantages of N = prompts × `group` rewards laid out prompt by prompt (NaN = unscorable)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale_rewards {scale!r}; choose one of {SCALES}")
    r = np.asarray(rewards, np.float64)
    grouped = r.reshape(-1, group)
    mean = np.repeat(np.nanmean(grouped, axis=1), group)
    with np.errstate(invalid="ignore", divide="ignore"):
        if scale == "batch":
            std = np.full_like(r, _nanstd(r) if r.size > 1 else 0.0)
        else:
            std = np.repeat(_nanstd(grouped, axis=1), group) if group > 1 else np.zeros_like(r)
    adv = r - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return np.nan_to_num(adv, nan=0.0)


def grpo_terms(xp, logps, old_logps, ref_logps, advantages, mask, *, epsilon_low: float = 0.2,
               epsilon_high: float = 0.2, beta: float = 0.0, delta: float | None = None, level: str = "token"):
    """Per-token losses (B, T), and the metric sums (METRICS) over the masked tokens.

    logps, old_logps, ref_logps (B, T) per-token log-probs of the completion tokens (ref_logps unused at beta 0);
    advantages (B,); mask (B, T) 1.0 on completion tokens."""
    adv = advantages[:, None]
    log_ratio = logps - old_logps
    if level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / xp.maximum(mask.sum(-1), mask.sum(-1) * 0 + 1.0))[:, None]
    elif level == "token":
        log_w = log_ratio
    else:
        raise ValueError(f"unknown importance_sampling_level {level!r}; choose token or sequence")
    coef_1 = xp.exp(log_w)
    coef_2 = xp.minimum(xp.maximum(coef_1, coef_1 * 0 + (1 - epsilon_low)), coef_1 * 0 + (1 + epsilon_high))
    if delta is not None:
        coef_1 = xp.minimum(coef_1, coef_1 * 0 + delta)
    per_token = -xp.minimum(coef_1 * adv, coef_2 * adv)
    sums = {}
    if beta != 0.0:
        d = ref_logps - logps
        kl = xp.exp(d) - d - 1
        per_token = per_token + beta * kl
        sums["kl"] = (kl * mask).sum()
    # clipped shares over the masked tokens (a sequence-level weight counts for each token of its row)
    low = ((coef_1 < 1 - epsilon_low) & (adv < 0)) * 1.0
    high = ((coef_1 > 1 + epsilon_high) & (adv > 0)) * 1.0
    sums.update({"clip_ratio/low_mean": (low * mask).sum(), "clip_ratio/high_mean": (high * mask).sum(),
                 "clip_ratio/region_mean": (xp.maximum(low, high) * mask).sum()})
    return per_token * (mask * 0 + 1.0), sums  # (B, 1) at sequence level: broadcast to (B, T)


def grpo_reduce(xp, per_token, mask, loss_type: str, max_completion_length: int):
    """(loss sum, count) of one micro-batch; the loop divides the step's total sum by its total count."""
    if loss_type == "grpo":
        rows = (per_token * mask).sum(-1) / xp.maximum(mask.sum(-1), mask.sum(-1) * 0 + 1.0)
        return rows.sum(), mask.sum() * 0 + mask.shape[0]
    if loss_type in ("bnpo", "dapo"):  # at least 1, as TRL clamps: every completion masked (all cut) is loss 0
        return (per_token * mask).sum(), xp.maximum(mask.sum(), mask.sum() * 0 + 1.0)
    if loss_type == "dr_grpo":
        return (per_token * mask).sum(), mask.sum() * 0 + mask.shape[0] * max_completion_length
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
