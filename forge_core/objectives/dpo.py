"""DPO and its loss variants against the policy at initialisation (objectives/reference.py), whose log-probs
are computed once before training. The formulas are forge_core/losses/dpo.py's, on the backend's arrays."""

from __future__ import annotations

from functools import partial

import numpy as np

from forge_core.distributed import World
from forge_core.errors import ForgeError
from forge_core.losses.dpo import METRICS, dpo_objective
from forge_core.objectives.pairs import PairObjective, pair_loss
from forge_core.objectives.reference import fingerprint, scored_once


def _dpo(xp, logps, ntok, batch, **kw):
    return dpo_objective(xp, logps, batch["ref_logps"], ntok, **kw)


def dpo_loss(ops, model, batch, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             sft_weight: float = 0.0, discopop_tau: float = 0.05):
    """The DPO family on ONE concatenated forward: rows [0, B) are chosen, [B, 2B) rejected.

    batch["ref_logps"] (2B,) holds the reference's sequence log-probs. Returns (sum of the per-pair
    losses, number of pairs, {metric: sum}).
    """
    return pair_loss(ops, model, batch, _dpo, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                     sft_weight=sft_weight, discopop_tau=discopop_tau)


def check_dpo_config(d) -> None:
    """The loss types' own bounds on label_smoothing (TRL checks the same)."""
    if d.loss_type == "robust" and not 0.0 <= d.label_smoothing < 0.5:
        raise ForgeError(f"dpo.label_smoothing: the robust loss needs 0 <= ε < 0.5 (the flip rate), got {d.label_smoothing}")
    if d.loss_type == "exo_pair" and not 0.0 < d.label_smoothing < 1.0:
        raise ForgeError(f"dpo.label_smoothing: the exo_pair loss needs 0 < ε < 1 (the EXO paper uses 1e-3), "
                         f"got {d.label_smoothing}")


class DPOObjective(PairObjective):
    kind = "dpo"
    METRICS = METRICS

    def __init__(self, kind, cfg, ops, model, tokenizer, run, console, world: World):
        d = cfg.dpo
        check_dpo_config(d)
        super().__init__(cfg, ops, model, tokenizer, console, world)
        self.loss_fn = partial(dpo_loss, ops, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                               sft_weight=d.sft_weight, discopop_tau=d.discopop_tau)
        ref = scored_once(run, world, console, "pairs", {"train": (self.rows, self._score),
                                                          "valid": (self.valid, self._score)}, fingerprint(cfg, "dpo"))
        self.ref = {"train": ref["train"], "valid": ref["valid"]}

    def extras(self, idx: np.ndarray, split: str) -> dict:
        ref = self.ref[split]
        return {"ref_logps": np.concatenate([ref[idx, 0], ref[idx, 1]]).astype(np.float32)}

    def _score(self, rows) -> np.ndarray:
        """(N, 2) chosen/rejected sequence log-probs of the current model, in row order."""
        self.model.eval()
        fn = self.ops.no_grad(self.model, partial(self.ops.sequence_logps, self.model))
        size, out = self.cfg.train.batch_size, []
        for s in range(0, len(rows), size):
            chunk = rows[s:s + size]
            lp = self.ops.to_numpy(fn(self.ops.to_batch(self.model, self.pairs(chunk)))).astype(np.float32)
            out.append(np.stack([lp[:len(chunk)], lp[len(chunk):]], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)
