"""Reference-free preference losses on pairs: ORPO, CPO and SimPO, for any array module.

Inputs per micro-batch, as the concatenated forward gives them: logps (2B,) completion log-prob SUMS (rows
[0, B) chosen, [B, 2B) rejected) and ntok (2B,) completion token counts. avg = logps / ntok.

ORPO (Hong et al. 2024), TRL 1.16 trl/experimental/orpo/orpo_trainer.py ORPOTrainer.odds_ratio_loss and
get_batch_loss_metrics:
    log_odds = (avg_w − avg_l) − (log(1 − e^{avg_w}) − log(1 − e^{avg_l}))
    loss     = NLL(chosen) − λ·mean(log σ(log_odds))          λ = orpo.beta; rewards β·avg
CPO (Xu et al. 2024) and SimPO (Meng et al. 2024), trl/experimental/cpo/cpo_trainer.py CPOTrainer.cpo_loss
and get_batch_loss_metrics, with z = lp_w − lp_l (lp = avg for ipo and simpo, else the sums):
    sigmoid  −(1−ε)·log σ(βz) − ε·log σ(−βz)        simpo: the same on z − γ/β (γ the target margin)
    hinge    max(0, 1 − βz)                         ipo: (z − 1/(2β))²
    loss     = mean(losses) + α·NLL(chosen)          α = sft_weight (TRL's cpo_alpha); rewards β·lp
NLL(chosen) is the token mean over the micro-batch's chosen completion tokens, as TRL's CrossEntropyLoss
takes it (TRL's ORPO also counts the prompt tokens; Forge scores completions only, as the paper's L_SFT).
Each function returns per-pair losses whose SUM over the micro-batch is B x TRL's loss, so the loop's
sum / count gives TRL's number.
"""

from __future__ import annotations

import typing

from forge_core.config import CpoLoss
from forge_core.losses.dpo import pair_metrics
from forge_core.losses.xp import log1mexp, log_sigmoid

CPO_LOSS_TYPES = typing.get_args(CpoLoss)


def _split(xp, logps, ntok):
    ntok = xp.maximum(ntok, ntok * 0 + 1)
    n = logps.shape[0] // 2
    nll = -logps[:n].sum() / ntok[:n].sum()  # token-mean NLL of the chosen completions in this micro-batch
    return n, logps / ntok, nll


def odds_ratio(xp, avg_c, avg_r):
    """(log σ(log_odds), log_odds) per pair, from per-token mean log-probs."""
    log_odds = (avg_c - avg_r) - (log1mexp(xp, avg_c) - log1mexp(xp, avg_r))
    return log_sigmoid(xp, log_odds), log_odds


def orpo_objective(xp, logps, ntok, beta: float):
    """Per-pair ORPO losses and metric sums."""
    n, avg, nll = _split(xp, logps, ntok)
    ratio, log_odds = odds_ratio(xp, avg[:n], avg[n:])
    losses = nll - beta * ratio
    metrics = pair_metrics(xp, beta * avg[:n], beta * avg[n:], avg[:n], avg[n:])
    metrics.update({"nll_loss": nll * n, "log_odds_ratio": ratio.sum(), "log_odds_chosen": log_odds.sum()})
    return losses, metrics


def cpo_terms(xp, lp_c, lp_r, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              gamma: float = 0.0):
    """Per-pair CPO / SimPO losses (before the NLL term) and rewards."""
    z = lp_c - lp_r
    if loss_type in ("sigmoid", "simpo"):
        if loss_type == "simpo":
            z = z - gamma / beta
        losses = -(1 - label_smoothing) * log_sigmoid(xp, beta * z) - label_smoothing * log_sigmoid(xp, -beta * z)
    elif loss_type == "hinge":
        losses = xp.maximum(1 - beta * z, z * 0)
    elif loss_type == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; choose one of {CPO_LOSS_TYPES + ('simpo',)}")
    return losses, beta * lp_c, beta * lp_r


def cpo_objective(xp, logps, ntok, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                  gamma: float = 0.0, sft_weight: float = 1.0):
    """Per-pair CPO / SimPO losses (NLL term included) and metric sums; loss_type "simpo" is SimPO."""
    n, avg, nll = _split(xp, logps, ntok)
    lp = avg if loss_type in ("ipo", "simpo") else logps
    losses, reward_c, reward_r = cpo_terms(xp, lp[:n], lp[n:], beta, loss_type, label_smoothing, gamma)
    if sft_weight:
        losses = losses + sft_weight * nll
    metrics = pair_metrics(xp, reward_c, reward_r, lp[:n], lp[n:])
    metrics["nll_loss"] = nll * n
    return losses, metrics
