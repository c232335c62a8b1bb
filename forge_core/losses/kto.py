"""KTO (Ethayarajh et al. 2024) on unpaired rows {prompt, completion, label}, for any array module.

TRL 1.16 trl/trainer/kto_trainer.py KTOTrainer._compute_loss (transcribed: TRL has no callable on log-probs
alone), with ρ = log π(y|x) − log π_ref(y|x) per row (completion log-prob sums):
    z0 = max(0, mean over the batch (all ranks) of log π(y'|x) − log π_ref(y'|x))   y' a MISMATCHED completion:
         row i's prompt with row i−1's completion, rotated within each chunk of rows (TRL: per-device batch;
         Forge: the global micro-batch, so the pairing does not change with the number of ranks); no gradient
    kto                desirable: 1 − σ(β(ρ − z0))        undesirable: 1 − σ(β(z0 − ρ))
    apo_zero_unpaired  desirable: 1 − σ(βρ)               undesirable: σ(βρ)           (no z0)
    loss = mean over the rows of (desirable_weight or undesirable_weight) x the row's term
    rewards: β·ρ, averaged over the desirable rows (rewards/chosen) and the undesirable ones (rewards/rejected)
"""

from __future__ import annotations

import typing

import numpy as np

from forge_core.config import KtoLoss
from forge_core.losses.xp import sigmoid

LOSS_TYPES = typing.get_args(KtoLoss)
# metric sums kto_objective returns; the n/* counts turn the per-label sums into means (kto_means)
METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "n/chosen", "n/rejected")


def kto_objective(xp, logps, ref, labels, z0, beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
                  undesirable_weight: float = 1.0):
    """Per-row KTO losses (B,) and metric sums. labels (B,) 1.0 desirable / 0.0 undesirable; z0 (1,) the
    reference point (reference_point), computed outside the gradient."""
    rho = logps - ref
    if loss_type == "kto":
        good, bad = 1 - sigmoid(xp, beta * (rho - z0)), 1 - sigmoid(xp, beta * (z0 - rho))
    elif loss_type == "apo_zero_unpaired":
        good, bad = 1 - sigmoid(xp, beta * rho), sigmoid(xp, beta * rho)
    else:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    losses = labels * desirable_weight * good + (1 - labels) * undesirable_weight * bad
    rewards = beta * rho
    metrics = {
        "rewards/chosen": (rewards * labels).sum(), "rewards/rejected": (rewards * (1 - labels)).sum(),
        "logps/chosen": (logps * labels).sum(), "logps/rejected": (logps * (1 - labels)).sum(),
        "kl": (z0 * (labels * 0 + 1)).sum(), "n/chosen": labels.sum(), "n/rejected": (1 - labels).sum(),
    }
    return losses, metrics


def reference_point(total: float, count: float) -> float:
    """z0 from the SUM of the mismatched pairs' log-ratios over `count` of them (every rank's rows): their mean,
    clamped at 0 as TRL clamps it."""
    return max(0.0, float(total) / max(float(count), 1.0))



def kto_means(sums: dict, count: float) -> dict:
    """Metric sums -> the means TRL logs: rewards/logps per label group, margin when both groups are present."""
    out = {}
    for side in ("chosen", "rejected"):
        n = sums.get(f"n/{side}", 0.0)
        if n > 0:
            out[f"rewards/{side}"] = sums[f"rewards/{side}"] / n
            out[f"logps/{side}"] = sums[f"logps/{side}"] / n
    if "rewards/chosen" in out and "rewards/rejected" in out:
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    if "kl" in sums:
        out["kl"] = sums["kl"] / max(count, 1.0)
    return out


def mismatched_partners(n_rows: int, chunk: int) -> np.ndarray:
    """partner[i]: the row whose completion goes with row i's prompt for z0 - TRL's rotation by one within each
    chunk of `chunk` rows: (x_1, y_k), (x_2, y_1), ..., (x_k, y_{k-1})."""
    idx = np.arange(n_rows)
    out = idx.copy()
    for start in range(0, n_rows, max(chunk, 1)):
        block = idx[start:start + chunk]
        out[start:start + len(block)] = np.roll(block, 1)
    return out
