"""DPO against the policy at initialisation, whose log-probs are computed once before training.

For PiSSA the policy at init is W_res + s·B0A0 (= the original model), not the adapter-off model W_res;
continuing from an SFT adapter it is that adapter. Either way it is exactly the model built before the
first step, so the data is scored with it once (RUN/reference_logps.safetensors) and no second copy of
the weights is ever kept. The formulas are forge_core/preference.py's, on the backend's array module.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from forge_core import data as fdata
from forge_core.adapters import safetensors_io as sio
from forge_core.distributed import World
from forge_core.objectives.base import Objective, load_split
from forge_core.preference import METRICS, dpo_objective


def dpo_loss(ops, model, batch, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             sft_weight: float = 0.0):
    """The DPO family on ONE concatenated forward: rows [0, B) are chosen, [B, 2B) rejected.

    batch["ref_logps"] (2B,) holds the reference's sequence log-probs. Returns (sum of the per-pair
    losses, number of pairs, {metric: sum}).
    """
    logps = ops.sequence_logps(model, batch)  # (2B,)
    losses, metrics = dpo_objective(ops.xp, logps, batch["ref_logps"], batch["mask"].sum(-1), beta, loss_type,
                                    label_smoothing, sft_weight)
    return losses.sum(), ops.scalar(logps.shape[0] // 2, logps), metrics


class DPOObjective(Objective):
    kind = "dpo"

    def __init__(self, cfg, ops, model, tokenizer, run, console, world: World):
        rows, valid = load_split(fdata.load_preferences, cfg, ops.hf_tokenizer(tokenizer), console)
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world)
        d = cfg.dpo
        self.loss_fn = partial(dpo_loss, ops, beta=d.beta, loss_type=d.loss_type,
                               label_smoothing=d.label_smoothing, sft_weight=d.sft_weight)
        self.ref, self.ref_valid = self._reference(run, console)
        self._eval = ops.no_grad(model, lambda b: self.loss_fn(model, b))

    def _pairs(self, rows) -> dict:
        b = fdata.collate_dpo(rows, self.pad)
        return fdata.add_loss_positions(b, self.cap)

    def batch(self, rows, ref: np.ndarray, idx) -> dict:
        b = self._pairs(rows)
        b["ref_logps"] = np.concatenate([ref[idx, 0], ref[idx, 1]]).astype(np.float32)
        return self.ops.to_batch(self.model, b)

    def _score(self, rows) -> np.ndarray:
        """(N, 2) chosen/rejected sequence log-probs of the current model, in row order."""
        self.model.eval()
        fn = self.ops.no_grad(self.model, partial(self.ops.sequence_logps, self.model))
        size, out = self.cfg.train.batch_size, []
        for s in range(0, len(rows), size):
            chunk = rows[s:s + size]
            lp = self.ops.to_numpy(fn(self.ops.to_batch(self.model, self._pairs(chunk)))).astype(np.float32)
            out.append(np.stack([lp[:len(chunk)], lp[len(chunk):]], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def _score_shared(self, rows) -> np.ndarray:
        """_score with the rows shared out: rank r scores rows r, r + world, ...; the sum over ranks of the
        zero-filled (N, 2) arrays is every row's score."""
        if self.world.size == 1 or not rows:  # every rank has the same rows: all skip the exchange alike
            return self._score(rows)
        mine = list(range(self.world.rank, len(rows), self.world.size))
        out = np.zeros((len(rows), 2), np.float32)
        if mine:
            out[mine] = self._score([rows[i] for i in mine])
        return self.world.sum(out)

    def _reference(self, run, console):
        from safetensors.numpy import load_file

        f = run.file("reference_logps.safetensors")
        if f.is_file():
            cached = load_file(str(f))
            if cached["train"].shape[0] == self.n_rows and cached["valid"].shape[0] == len(self.valid):
                return cached["train"], cached["valid"]
        console.print(f"scoring {self.n_rows + len(self.valid)} pairs with the reference (policy at init)...")
        ref = {"train": self._score_shared(self.rows), "valid": self._score_shared(self.valid)}
        if self.world.main:
            sio.save(f, ref)
        return ref["train"], ref["valid"]

    def next_batch(self):
        idx = np.array(self.next_indices())
        return self.batch([self.rows[i] for i in idx], self.ref, idx)

    def evaluate(self) -> dict:
        if not self.valid:
            return {}
        self.model.eval()
        sums, n = {}, 0.0
        for start, stop in self.eval_batches():
            loss, count, metrics = self._eval(self.batch(self.valid[start:stop], self.ref_valid,
                                                         np.arange(start, stop)))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += count.item()
        keys = ["loss", *METRICS]  # the same list on every rank, even one without validation batches
        *totals, n = self.world.sum([sums.get(k, 0.0) for k in keys] + [n])
        return {k: float(v / max(n, 1)) for k, v in zip(keys, totals)}
