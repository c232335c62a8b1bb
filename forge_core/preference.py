"""The DPO family of losses, written once for any array module (numpy, mlx.core, torch).

With π the policy, π_ref the reference, y_w / y_l the chosen / rejected completions and
    h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]
(TRL's formulas, https://huggingface.co/docs/trl dpo_trainer):
    sigmoid (DPO):  −(1−ε)·log σ(β·h) − ε·log σ(−β·h)        ε = label_smoothing (cDPO)
    ipo:            (h − 1/(2β))²                             log-probs are per-token MEANS here
    hinge (SLiC):   max(0, 1 − β·h)
    rewards:        r_w = β·(log π(y_w) − log π_ref(y_w)),  r_l likewise
"""

from __future__ import annotations

import typing

from forge_core.config import DpoLoss

LOSS_TYPES = typing.get_args(DpoLoss)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")  # the metric sums dpo_objective returns, in this order


def _log_sigmoid(xp, x):
    # log σ(x) = −log(1 + e^{−x}) = −logaddexp(0, −x): stable for large |x|
    return -xp.logaddexp(x * 0, -x)


def dpo_terms(xp, pol_c, pol_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and rewards. Inputs are per-sequence log-probs (sums; means for ipo)."""
    h = (pol_c - ref_c) - (pol_r - ref_r)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * _log_sigmoid(xp, beta * h) - label_smoothing * _log_sigmoid(xp, -beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = xp.maximum(1 - beta * h, h * 0)
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return losses, beta * (pol_c - ref_c), beta * (pol_r - ref_r)


def dpo_objective(xp, logps, ref, ntok, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  sft_weight: float = 0.0):
    """The DPO step on one concatenated batch, for any array module.

    logps, ref, ntok: (2B,) policy and reference sequence log-probs (sums over completion tokens) and
    completion token counts; rows [0, B) are chosen, [B, 2B) rejected. IPO uses per-token means (as
    TRL does); sft_weight adds the RPO-style NLL of chosen (per token). Returns (per-pair losses (B,),
    metric sums {name: scalar}).
    """
    ntok = xp.maximum(ntok, ntok * 0 + 1)
    n = logps.shape[0] // 2
    nll_chosen = -logps[:n] / ntok[:n]  # per-token NLL of chosen, from the sums
    if loss_type == "ipo":
        logps, ref = logps / ntok, ref / ntok
    pol_c, pol_r = logps[:n], logps[n:]
    losses, reward_c, reward_r = dpo_terms(xp, pol_c, pol_r, ref[:n], ref[n:], beta, loss_type, label_smoothing)
    if sft_weight:
        losses = losses + sft_weight * nll_chosen
    metrics = {
        "rewards/chosen": reward_c.sum(), "rewards/rejected": reward_r.sum(),
        "rewards/margin": (reward_c - reward_r).sum(),
        "rewards/accuracy": xp.where(reward_c > reward_r, 1.0, 0.0).sum(),
        "logps/chosen": pol_c.sum(), "logps/rejected": pol_r.sum(),
    }
    return losses, metrics
