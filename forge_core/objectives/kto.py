"""KTO on unpaired {prompt, completion, label} rows (pairs are split in two), against the policy at init.

The rows are taken in one fixed (seeded) order, a global micro-batch at a time, and each row's MISMATCHED
completion is its neighbour's in the same micro-batch (TRL's rotation). Before each step the current policy
scores the step's mismatched pairs without gradient, giving the reference point z0 of each micro-batch
(averaged over every rank's rows, in one exchange); the step then runs on the matched rows with z0 as a
constant. The reference's log-probs of both - matched and mismatched - are scored once before training
(objectives/reference.py). Formulas: forge_core/losses/kto.py.
"""

from __future__ import annotations

from functools import partial

import numpy as np

from forge_core import data as fdata
from forge_core.distributed import World
from forge_core.errors import ForgeError
from forge_core.losses.kto import METRICS, kto_means, kto_objective, mismatched_partners, reference_point
from forge_core.objectives.base import Objective, exchange, load_split
from forge_core.objectives.reference import fingerprint, scored_once


def kto_loss(ops, model, batch, beta: float, loss_type: str = "kto", desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0):
    """(sum of the per-row losses, rows, metric sums) on a batch with ref_logps, labels and z0."""
    logps = ops.sequence_logps(model, batch)
    losses, metrics = kto_objective(ops.xp, logps, batch["ref_logps"], batch["labels"], batch["z0"], beta,
                                    loss_type, desirable_weight, undesirable_weight)
    return losses.sum(), ops.scalar(logps.shape[0], logps), metrics


class KTOObjective(Objective):
    kind = "kto"

    def __init__(self, kind, cfg, ops, model, tokenizer, run, console, world: World):
        rows, valid = load_split(fdata.load_unpaired, cfg, ops.hf_tokenizer(tokenizer), console)
        k = cfg.kto
        self.with_z0 = k.loss_type == "kto"  # apo_zero_unpaired has no reference point
        size = cfg.train.batch_size * world.size
        if self.with_z0 and size < 2:
            raise ForgeError("kto: z0 pairs each row with another row of its micro-batch, so it needs at least 2 rows "
                             "per micro-batch (train.batch_size x ranks); raise train.batch_size")
        # TRL's layout: batches taken in a FIXED order, each row's mismatched completion its neighbour's in the
        # same batch (the same set of completions, other prompts). Forge shuffles once (seeded) rather than per
        # epoch, so that the reference can score the mismatched pairs before training.
        seed = cfg.train.seed if cfg.data.shuffle else None
        rows, valid = fixed_order(rows, size, seed), fixed_order(valid, cfg.train.batch_size, seed)
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world, shuffle=False)
        self.splits = {"train": rows, "valid": valid}
        self.partner = {"train": mismatched_partners(len(rows), size),  # eval batches: batch_size rows each
                        "valid": mismatched_partners(len(valid), cfg.train.batch_size)}
        self.beta, self._pending = k.beta, []
        _balance_note(rows, k, console)
        self.loss_fn = partial(kto_loss, ops, beta=k.beta, loss_type=k.loss_type,
                               desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight)
        self._logps = ops.no_grad(model, partial(ops.sequence_logps, model))
        self.ref = scored_once(run, world, console, "rows and their mismatched pairs",
                               {"train": (rows, partial(self._score, "train")),
                                "valid": (valid, partial(self._score, "valid"))},
                               fingerprint(cfg, "kto", mismatched_chunk=size))

    def _collate(self, seqs) -> dict:
        return fdata.add_loss_positions(fdata.collate_completions(seqs, self.pad), self.cap)

    def _seqs(self, split: str, idx, mismatched: bool) -> list:
        rows = self.splits[split]
        if not mismatched:
            return [(rows[i].prompt, rows[i].completion) for i in idx]
        # another row's completion after this prompt can be longer than any real row: cut it as a row is cut
        limit = self.cfg.train.max_seq_len
        return [fdata.truncate_preference(rows[i].prompt, rows[j].completion, rows[j].completion, limit)[:2]
                for i, j in zip(idx, self.partner[split][idx])]

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
        pos = {id(r): i for i, r in enumerate(self.splits[split])}
        idx = np.array([pos[id(r)] for r in rows], dtype=np.int64)
        size, out = self.cfg.train.batch_size, []
        for s in range(0, len(idx), size):
            part = idx[s:s + size]
            out.append(np.stack([self._logps_of(self._seqs(split, part, False)),
                                 self._logps_of(self._seqs(split, part, True))], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def _kl_sum(self, split: str, idx: np.ndarray) -> float:
        """Σ over these rows of log π(y'|x) − log π_ref(y'|x) on their mismatched pairs (no gradient)."""
        return float(np.sum(self._logps_of(self._seqs(split, idx, True)) - self.ref[split][idx, 1]))

    def prepare_step(self, micro_batches: int) -> None:
        """The step's micro-batches and their z0, before any gradient: z0 averages every rank's rows, and all
        micro-batches' sums go in ONE exchange with a failure flag, so a rank that fails here (out of memory)
        never leaves the others inside a collective - every rank then raises, and the loop stops them alike."""
        idxs = [np.array(self.next_indices()) for _ in range(micro_batches)]
        sums, failed = [], None
        if self.with_z0:
            try:
                for idx in idxs:
                    sums += [self._kl_sum("train", idx), float(len(idx))]
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks heard of it
                failed, sums = exc, [0.0, 0.0] * micro_batches
        else:
            sums = [0.0, 1.0] * micro_batches
        totals = exchange(self.world, sums, failed, "scoring KTO's mismatched pairs")
        self._pending = [(idx, reference_point(s, c)) for idx, s, c in zip(idxs, totals[0::2], totals[1::2])]

    def _labels(self, split: str, idx) -> np.ndarray:
        """1.0 for a desirable row, 0.0 for an undesirable one."""
        return np.array([1.0 if self.splits[split][i].label else 0.0 for i in idx], np.float32)

    def batch(self, split: str, idx: np.ndarray, z0: float) -> dict:
        b = self._collate(self._seqs(split, idx, False))
        b["ref_logps"] = self.ref[split][idx, 0].astype(np.float32)
        b["labels"] = self._labels(split, idx)
        b["z0"] = np.full((1,), z0, np.float32)
        return self.ops.to_batch(self.model, b)

    def next_batch(self):
        if not self._pending:  # called outside the loop (tools): this micro-batch alone
            self.prepare_step(1)
        idx, z0 = self._pending.pop(0)
        return self.batch("train", idx, z0)

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
        seen = np.zeros(len(self.valid), np.float32)  # train.eval_batches may evaluate only some rows
        for start, stop in self.eval_batches():
            idx = np.arange(start, stop)
            z0 = reference_point(self._kl_sum("valid", idx), len(idx)) if self.with_z0 else 0.0  # this rank's batch
            logps = self._logps_of(self._seqs("valid", idx, False))
            ref = self.ref["valid"][idx, 0]
            losses, metrics = kto_objective(np, logps, ref, self._labels("valid", idx), np.float32(z0), self.beta, self.cfg.kto.loss_type,
                                            self.cfg.kto.desirable_weight, self.cfg.kto.undesirable_weight)
            for key, v in {"loss": losses.sum(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(v)
            n += len(idx)
            rewards[idx], seen[idx] = self.beta * (logps - ref), 1.0
        keys = ["loss", *METRICS]
        *totals, n = self.world.sum([sums.get(k, 0.0) for k in keys] + [n])
        rewards, seen = self.world.sum(rewards), self.world.sum(seen)
        out = {"loss": float(totals[0] / max(n, 1)), **kto_means(dict(zip(keys[1:], totals[1:])), n)}
        out.update(_pairwise(self.valid, rewards, seen > 0))
        return out


def fixed_order(rows: list, chunk: int, seed: int | None) -> list:
    """The order KTO takes its rows in: with a seed, a shuffle in which no row's mismatched partner (its
    neighbour within its chunk) shares its prompt - the first of up to 100 seeded shuffles with none, else the
    one with fewest; without (data.shuffle false), the rows as given, except that the halves of split pairs
    go chosen first, then rejected, as TRL's unpair_preference_dataset lays them out."""
    if seed is None or len(rows) < 2:
        return [r for r in rows if r.pair < 0 or r.label] + [r for r in rows if r.pair >= 0 and not r.label]
    prompts = np.array([hash(r.prompt.tobytes()) for r in rows])
    best = None
    for attempt in range(100):
        order = np.random.default_rng((seed + 7919 * attempt) % 2**63).permutation(len(rows))
        p = prompts[order]
        clashes = int(np.sum(p == p[mismatched_partners(len(rows), chunk)]))
        if best is None or clashes < best[0]:
            best = (clashes, order)
        if clashes == 0:
            break
    return [rows[i] for i in best[1]]


def _pairwise(rows, rewards: np.ndarray, seen: np.ndarray) -> dict:
    """Reward accuracy over the evaluated rows that were split from pairs (the margin is kto_means' already)."""
    chosen, rejected = {}, {}
    for i, r in enumerate(rows):
        if r.pair >= 0 and seen[i]:
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
