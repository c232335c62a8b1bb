"""What the methods on {prompt, chosen, rejected} pairs share (DPO, ORPO, SimPO, CPO): the pairs, one
concatenated forward of chosen + rejected per micro-batch (torchtune's layout: rows [0, B) chosen, [B, 2B)
rejected), and the held-out averages of the method's metrics."""

from __future__ import annotations

import numpy as np

from forge_core import data as fdata
from forge_core.distributed import World
from forge_core.objectives.base import Objective, load_split


def pair_loss(ops, model, batch, objective, **kw):
    """Run `objective(xp, logps (2B,), ntok (2B,), batch, **kw) -> (per-pair losses, metric sums)` on the
    policy's completion log-probs; returns (sum of the per-pair losses, number of pairs, metric sums)."""
    logps = ops.sequence_logps(model, batch)
    losses, metrics = objective(ops.xp, logps, batch["mask"].sum(-1), batch, **kw)
    return losses.sum(), ops.scalar(logps.shape[0] // 2, logps), metrics


class PairObjective(Objective):
    """Subclasses set kind, METRICS (the metric sums their loss returns) and self.loss_fn, and may add
    per-row inputs to the batch (extras)."""

    METRICS: tuple = ()

    def __init__(self, cfg, ops, model, tokenizer, console, world: World):
        rows, valid = load_split(fdata.load_preferences, cfg, ops.hf_tokenizer(tokenizer), console)
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world)

    def pairs(self, rows) -> dict:
        return fdata.add_loss_positions(fdata.collate_dpo(rows, self.pad), self.cap)

    def extras(self, idx: np.ndarray, split: str) -> dict:
        """Per-pair inputs beyond the tokens (DPO: the reference's log-probs)."""
        return {}

    def batch(self, rows, idx: np.ndarray, split: str = "train"):
        return self.ops.to_batch(self.model, {**self.pairs(rows), **self.extras(idx, split)})

    def next_batch(self):
        idx = np.array(self.next_indices())
        return self.batch([self.rows[i] for i in idx], idx)

    def evaluate(self) -> dict:
        if not self.valid:
            return {}
        if not hasattr(self, "_eval"):
            self._eval = self.ops.no_grad(self.model, lambda b: self.loss_fn(self.model, b))
        self.model.eval()
        sums, n = {}, 0.0
        for start, stop in self.eval_batches():
            loss, count, metrics = self._eval(self.batch(self.valid[start:stop], np.arange(start, stop), "valid"))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += count.item()
        keys = ["loss", *self.METRICS]  # the same list on every rank, even one without validation batches
        *totals, n = self.world.sum([sums.get(k, 0.0) for k in keys] + [n])
        return {"loss": float(totals[0] / max(n, 1)), **self.metric_means(dict(zip(keys[1:], totals[1:])), n)}
