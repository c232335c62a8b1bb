"""The DPO family: losses against a reference, written once for any array module (numpy, mlx.core, torch).

With π the policy, π_ref the reference, y_w / y_l the chosen / rejected completions, per-sequence log-prob
SUMS, the log-ratios ρ_w = log π(y_w) − log π_ref(y_w), ρ_l likewise, h = ρ_w − ρ_l, ε = label_smoothing.
TRL 1.16, trl/trainer/dpo_trainer.py DPOTrainer._compute_loss (the `loss_type ==` branches):
    sigmoid       −(1−ε)·log σ(βh) − ε·log σ(−βh)     (ε > 0: cDPO, TRL's sigmoid before 1.0; 1.16 has ε = 0)
    ipo           (h̄ − 1/(2β))²                        h̄: h from per-token MEANS (Azar et al. 2023, as TRL)
    hinge         max(0, 1 − βh)                        SLiC (Zhao et al. 2023)
    robust        [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)       rDPO (Chowdhury et al. 2024), 0 ≤ ε < 0.5
    bco_pair      −log σ(βρ_w) − log σ(−βρ_l)                          BCO (Jung et al. 2024), paired form
    exo_pair      σ(βh)(log σ(βh) − log(1−ε)) + σ(−βh)(log σ(−βh) − log ε)   EXO (Ji et al. 2024), ε > 0
    nca_pair      −log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l)       NCA (Chen et al. 2024)
    sppo_hard     (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))²                    SPPO (Wu et al. 2024), hard labels
    apo_zero      1 − σ(βρ_w) + σ(βρ_l)                                APO-zero (D'Oosterlinck et al. 2024)
    apo_down      σ(βρ_w) + 1 − σ(β(ρ_w − ρ_l))                        APO-down
    aot           sigmoid on sort(log π_w − log π_l) − sort(ref's)     AOT (Melnyk et al. 2024), over the batch
    aot_unpaired  sigmoid on sort(ρ_w) − sort(ρ_l)
    discopop      (1−m)·(−log σ(βh)) + m·e^{−βh},  m = σ(βh/τ)          DiscoPOP (Lu et al. 2024)
    sigmoid_norm  −log σ(β h̄)                                           sigmoid on per-token means
    rewards       r_w = β·ρ_w, r_l = β·ρ_l (from the sums, for every loss type, as TRL logs them)
"""

from __future__ import annotations

import math
import typing

from forge_core.config import DpoLoss
from forge_core.losses.xp import log_sigmoid, sigmoid, sort

LOSS_TYPES = typing.get_args(DpoLoss)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
           "logps/rejected")  # the metric sums the paired objectives return, in this order
PER_TOKEN = ("ipo", "sigmoid_norm")  # compare per-token MEAN log-ratios


def _smoothed(xp, z, eps: float):
    return -(1 - eps) * log_sigmoid(xp, z) - eps * log_sigmoid(xp, -z)


def dpo_terms(xp, pol_c, pol_r, ref_c, ref_r, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              ntok_c=None, ntok_r=None, discopop_tau: float = 0.05):
    """Per-pair losses and rewards from per-sequence log-prob sums (ntok_*: completion token counts, needed by
    the per-token loss types; without them the inputs are taken as means already)."""
    eps = label_smoothing
    rho_w, rho_l = pol_c - ref_c, pol_r - ref_r
    h = rho_w - rho_l
    if loss_type in PER_TOKEN:
        h = (rho_w / ntok_c - rho_l / ntok_r) if ntok_c is not None else h
    if loss_type in ("sigmoid", "sigmoid_norm"):
        losses = _smoothed(xp, beta * h, eps if loss_type == "sigmoid" else 0.0)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = xp.maximum(1 - beta * h, h * 0)
    elif loss_type == "robust":
        losses = (-(1 - eps) * log_sigmoid(xp, beta * h) + eps * log_sigmoid(xp, -beta * h)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -log_sigmoid(xp, beta * rho_w) - log_sigmoid(xp, -beta * rho_l)
    elif loss_type == "exo_pair":
        z = beta * h
        losses = (sigmoid(xp, z) * (log_sigmoid(xp, z) - math.log1p(-eps))
                  + sigmoid(xp, -z) * (log_sigmoid(xp, -z) - math.log(eps)))
    elif loss_type == "nca_pair":
        losses = (-log_sigmoid(xp, beta * rho_w) - 0.5 * log_sigmoid(xp, -beta * rho_w)
                  - 0.5 * log_sigmoid(xp, -beta * rho_l))
    elif loss_type == "sppo_hard":
        losses = (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - sigmoid(xp, beta * rho_w) + sigmoid(xp, beta * rho_l)
    elif loss_type == "apo_down":
        losses = sigmoid(xp, beta * rho_w) + 1 - sigmoid(xp, beta * (rho_w - rho_l))
    elif loss_type == "aot":
        losses = _smoothed(xp, beta * (sort(xp, pol_c - pol_r) - sort(xp, ref_c - ref_r)), eps)
    elif loss_type == "aot_unpaired":
        losses = _smoothed(xp, beta * (sort(xp, rho_w) - sort(xp, rho_l)), eps)
    elif loss_type == "discopop":
        z = beta * h
        m = sigmoid(xp, z / discopop_tau)
        losses = -log_sigmoid(xp, z) * (1 - m) + xp.exp(-z) * m
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; choose one of {LOSS_TYPES}")
    return losses, beta * rho_w, beta * rho_l


def pair_metrics(xp, reward_c, reward_r, pol_c, pol_r) -> dict:
    """The metric sums every paired method reports (TRL's rewards/* and logps/*)."""
    return {
        "rewards/chosen": reward_c.sum(), "rewards/rejected": reward_r.sum(),
        "rewards/margin": (reward_c - reward_r).sum(),
        "rewards/accuracy": xp.where(reward_c > reward_r, 1.0, 0.0).sum(),
        "logps/chosen": pol_c.sum(), "logps/rejected": pol_r.sum(),
    }


def dpo_objective(xp, logps, ref, ntok, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  sft_weight: float = 0.0, discopop_tau: float = 0.05):
    """The DPO step on one concatenated batch, for any array module.

    logps, ref, ntok: (2B,) policy and reference sequence log-probs (sums over completion tokens) and
    completion token counts; rows [0, B) are chosen, [B, 2B) rejected. sft_weight adds the RPO-style NLL of
    chosen (per token). Returns (per-pair losses (B,), metric sums {name: scalar}).
    """
    ntok = xp.maximum(ntok, ntok * 0 + 1)
    n = logps.shape[0] // 2
    pol_c, pol_r = logps[:n], logps[n:]
    losses, reward_c, reward_r = dpo_terms(xp, pol_c, pol_r, ref[:n], ref[n:], beta, loss_type, label_smoothing,
                                           ntok[:n], ntok[n:], discopop_tau)
    if sft_weight:
        losses = losses + sft_weight * (-pol_c / ntok[:n])  # per-token NLL of chosen, from the sums
    return losses, pair_metrics(xp, reward_c, reward_r, pol_c, pol_r)
