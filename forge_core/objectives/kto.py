"""KTO on unpaired {prompt, completion, label} rows (pairs are split in two), against the policy at init.

Each micro-batch first scores its MISMATCHED pairs (row i's prompt with its partner's completion, fixed at
load time by TRL's rotation) with the current policy, without gradient, to get the reference point z0
(averaged over every rank's rows); then the step runs on the matched rows with z0 as a constant. The
reference's log-probs of both - matched and mismatched - are scored once before training
(objectives/reference.py). Formulas: forge_core/losses/kto.py.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from forge_core import data as fdata
from forge_core.distributed import World
from forge_core.losses.kto import METRICS, kl_reference_point, kto_means, kto_objective, mismatched_partners
from forge_core.objectives.base import Objective, load_split
from forge_core.objectives.reference import scored_once


def kto_loss(ops, model, batch, beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """(sum of the per-row losses, rows, metric sums) on a batch with ref_logps, labels and z0."""
    logps = ops.sequence_logps(model, batch)
    losses, metrics = kto_objective(ops.xp, logps, batch["ref_logps"], batch["labels"], batch["z0"], beta,
                                    loss_type, desirable_weight, undesirable_weight)
    return losses.sum(), ops.scalar(logps.shape[0], logps), metrics


class KTOObjective(Objective):
    kind = "kto"

    def __init__(self, cfg, ops, model, tokenizer, run, console, world: World):
        rows, valid = load_split(fdata.load_unpaired, cfg, ops.hf_tokenizer(tokenizer), console)
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world)
        k = cfg.kto
        self.with_z0 = k.loss_type == "kto"  # apo_zero_unpaired has no reference point
        self.beta = k.beta
        # chunks of the GLOBAL micro-batch (TRL: of the per-device batch): the pairing, and so z0, is the same
        # for any number of ranks at one global batch
        self.partner = {"train": mismatched_partners(len(rows), self.global_micro_batch),
                        "valid": mismatched_partners(len(valid), self.global_micro_batch)}
        _balance_note(rows, k, console)
        self.loss_fn = partial(kto_loss, ops, beta=k.beta, loss_type=k.loss_type,
                               desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
        self._logps = ops.no_grad(model, partial(ops.sequence_logps, model))
        self.ref = scored_once(run, world, console, "rows and their mismatched pairs",
                               {"train": (rows, partial(self._score, "train")),
                                "valid": (valid, partial(self._score, "valid"))})

    def _collate(self, seqs) -> dict:
        return fdata.add_loss_positions(fdata.collate_completions(seqs, self.pad), self.cap)

    def _seqs(self, split: str, idx, mismatched: bool) -> list:
        rows = self.rows if split == "train" else self.valid
        other = self.partner[split][idx] if mismatched else idx
        return [(rows[i].prompt, rows[j].completion) for i, j in zip(idx, other)]

    def _logps_of(self, seqs) -> np.ndarray:
        """The current policy's completion log-probs, no gradient, in eval mode (no dropout)."""
        training = self.model.training
        self.model.eval()
        out = self.ops.to_numpy(self._logps(self.ops.to_batch(self.model, self._collate(seqs)))).astype(np.float32)
        if training:
            self.model.train()
        return out

    def _score(self, split: str, rows) -> np.ndarray:
        """(N, 2): log-probs of each row's own completion and of its mismatched pair's. `rows` is the split's
        rows or (under a launcher) a subset of them; the partner comes from the whole split."""
        pos = {id(r): i for i, r in enumerate(self.rows if split == "train" else self.valid)}
        idx = np.array([pos[id(r)] for r in rows], dtype=np.int64)
        size, out = self.cfg.train.batch_size, []
        for s in range(0, len(idx), size):
            part = idx[s:s + size]
            out.append(np.stack([self._logps_of(self._seqs(split, part, False)),
                                 self._logps_of(self._seqs(split, part, True))], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def z0(self, split: str, idx: np.ndarray, world: World | None) -> float:
        if not self.with_z0:
            return 0.0
        return kl_reference_point(self._logps_of(self._seqs(split, idx, True)), self.ref[split][idx, 1], world)

    def batch(self, split: str, idx: np.ndarray, z0: float) -> dict:
        rows = self.rows if split == "train" else self.valid
        b = self._collate(self._seqs(split, idx, False))
        b["ref_logps"] = self.ref[split][idx, 0].astype(np.float32)
        b["labels"] = np.array([1.0 if rows[i].label else 0.0 for i in idx], np.float32)
        b["z0"] = np.full((1,), z0, np.float32)
        return self.ops.to_batch(self.model, b)

    def next_batch(self):
        idx = np.array(self.next_indices())
        return self.batch("train", idx, self.z0("train", idx, self.world))  # z0 over every rank's rows

    def metric_means(self, sums: dict, count: float) -> dict:
        return kto_means(sums, count)

    def evaluate(self) -> dict:
        """Loss and metrics over the held-out rows (z0 per validation batch, on this rank), and for rows split
        from pairs the pairwise reward accuracy: β·ρ(chosen) > β·ρ(rejected)."""
        if not self.valid:
            return {}
        self.model.eval()
        sums, n = {}, 0.0
        rewards = np.zeros(len(self.valid), np.float32)
        for start, stop in self.eval_batches():
            idx = np.arange(start, stop)
            z0 = self.z0("valid", idx, None)  # not a collective: ranks may hold different numbers of batches
            logps = self._logps_of(self._seqs("valid", idx, False))
            ref = self.ref["valid"][idx, 0]
            labels = np.array([1.0 if self.valid[i].label else 0.0 for i in idx], np.float32)
            losses, metrics = kto_objective(np, logps, ref, labels, np.float32(z0), self.beta, self.cfg.kto.loss_type,
                                            self.cfg.kto.desirable_weight, self.cfg.kto.undesirable_weight)
            for key, v in {"loss": losses.sum(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            n += len(idx)
            rewards[idx] = self.beta * (logps - ref)
        keys = ["loss", *METRICS]
        *totals, n = self.world.sum([sums.get(k, 0.0) for k in keys] + [n])
        rewards = self.world.sum(rewards) if self.world.size > 1 else rewards
        out = {"loss": float(totals[0] / max(n, 1)), **kto_means(dict(zip(keys[1:], totals[1:])), n)}
        out.update(_pairwise(self.valid, rewards))
        return out


def _pairwise(rows, rewards: np.ndarray) -> dict:
    """Reward accuracy over the rows that were split from pairs (the margin is kto_means' already)."""
    chosen, rejected = {}, {}
    for i, r in enumerate(rows):
        if r.pair >= 0:
            (chosen if r.label else rejected)[r.pair] = rewards[i]
    both = [p for p in chosen if p in rejected]
    if not both:
        return {}
    return {"rewards/accuracy": float(np.mean([chosen[p] > rejected[p] for p in both]))}


def _balance_note(rows, k, console) -> None:
    """TRL's check (after Eq. 8 of the KTO paper): with unequal counts, weight x count should favour neither
    side by more than 4/3; the note says which weights would."""
    good = max(sum(r.label for r in rows), 1)
    bad = max(len(rows) - good, 1)
    if good == bad:
        return
    lo_d, hi_d = bad * k.undesirable_weight / good, bad * k.undesirable_weight / good * 1.33
    lo_u, hi_u = good * k.desirable_weight / bad / 1.33, good * k.desirable_weight / bad
    if not (lo_d <= k.desirable_weight <= hi_d or lo_u <= k.undesirable_weight <= hi_u):
        console.print(f"note: {good} desirable vs {bad} undesirable rows; the KTO paper's balance suggests "
                      f"kto.desirable_weight in [{lo_d:.2f}, {hi_d:.2f}] or kto.undesirable_weight in "
                      f"[{lo_u:.2f}, {hi_u:.2f}] (not both)")
