"""The reference-free pair methods: ORPO (odds ratio + NLL), SimPO (length-normalised reward, target margin)
and CPO (sum log-prob reward + NLL). Nothing is scored before training: they train from the model as built
(the base, or the SFT adapter they continue) in one phase. Formulas: forge_core/losses/paired.py."""

from __future__ import annotations

from functools import partial

from forge_core.distributed import World
from forge_core.losses.dpo import METRICS
from forge_core.losses.paired import cpo_objective, orpo_objective
from forge_core.objectives.pairs import PairObjective, pair_loss


def orpo_loss(ops, model, batch, beta: float):
    return pair_loss(ops, model, batch, lambda xp, logps, ntok, _: orpo_objective(xp, logps, ntok, beta))


def cpo_loss(ops, model, batch, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.0, sft_weight: float = 1.0):
    """CPO, or SimPO with loss_type "simpo"."""
    return pair_loss(ops, model, batch, lambda xp, logps, ntok, _: cpo_objective(
        xp, logps, ntok, beta, loss_type, label_smoothing, gamma, sft_weight))


class ReferenceFreeObjective(PairObjective):
    def __init__(self, kind: str, cfg, ops, model, tokenizer, run, console, world: World):
        super().__init__(cfg, ops, model, tokenizer, console, world)
        self.kind = kind
        if kind == "orpo":
            self.METRICS = METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")
            self.loss_fn = partial(orpo_loss, ops, beta=cfg.orpo.beta)
        elif kind == "simpo":
            s = cfg.simpo
            self.METRICS = METRICS + ("nll_loss",)
            self.loss_fn = partial(cpo_loss, ops, beta=s.beta, loss_type="simpo", label_smoothing=s.label_smoothing,
                                   gamma=s.gamma, sft_weight=s.sft_weight)
        elif kind == "cpo":
            c = cfg.cpo
            self.METRICS = METRICS + ("nll_loss",)
            self.loss_fn = partial(cpo_loss, ops, beta=c.beta, loss_type=c.loss_type,
                                   label_smoothing=c.label_smoothing, sft_weight=c.sft_weight)
        else:
            raise ValueError(f"not a reference-free pair method: {kind!r}")
