"""What every objective shares: its rows, a resumable seeded batch order, and how validation is batched.

An objective is what the loop optimises (forge_core/train.py):
    obj.loss_fn(model, batch) -> (loss SUM, count, {metric: sum})    tensor math via the backend's ops
    obj.next_batch() -> framework batch     obj.evaluate() -> {metric: mean over the validation rows}
    obj.state() / obj.restore(state, arrays) the data position (and checkpoint_arrays()), for exact resume
    obj.metric_means(sums, count)           the logged metrics from the global batch's sums
"""

from __future__ import annotations

import numpy as np

from forge_core import data as fdata
from forge_core.distributed import World
from forge_core.errors import ForgeError
from forge_core.memory.guard import MemoryGuard


class Objective:
    kind = ""

    def __init__(self, cfg, ops, model, tokenizer, rows: list, valid: list, world: World, *,
                 per_rank: int | None = None, shuffle: bool | None = None, cap: int | None = None,
                 n_rows: int | None = None):
        """The parts every objective has. What a method may set otherwise (all default to SFT's):
        per_rank  rows of the data order each rank takes per draw (train.batch_size; GRPO: prompts per generation)
        shuffle   whether the order is reshuffled each epoch (data.shuffle; KTO: False, its rows come in a fixed
                  seeded order)
        cap       loss positions per row (the most trained tokens in any row; GRPO: a completion's length)
        n_rows    what an epoch counts for train.epochs (the rows; GRPO: prompts x G x num_iterations)"""
        self.cfg, self.ops, self.model, self.world = cfg, ops, model, world
        self.rows, self.valid = rows, valid
        self.n_rows = len(rows) if n_rows is None else n_rows
        self.per_rank = cfg.train.batch_size if per_rank is None else per_rank
        world.check_rows(len(rows), self.per_rank)
        self.pad = fdata.pad_token_id(ops.hf_tokenizer(tokenizer))
        # the most trained tokens in any row, so every batch of a width pads its loss positions to one
        # size: one compiled shape per batch width (forge_mlx/head.py runs the head at those positions)
        self.cap = fdata.loss_row_cap(rows + valid) if cap is None else cap
        # ONE order of global draws (per_rank x world), the single-process order at that size
        self.order = fdata.BatchOrder(len(rows), self.per_rank * world.size, cfg.train.seed,
                                      cfg.data.shuffle if shuffle is None else shuffle)

    @property
    def global_micro_batch(self) -> int:
        return self.cfg.train.batch_size * self.world.size

    def next_indices(self) -> list[int]:
        """This rank's rows of the next global draw."""
        return self.world.shard(self.order.next_batch(), self.per_rank)

    def state(self) -> dict:
        return self.order.state()

    def checkpoint_arrays(self, state: dict) -> dict:
        """Arrays a checkpoint at `state` (this objective's state()) must hold besides it; most objectives: none."""
        return {}

    def restore(self, state: dict | None, arrays: dict | None = None) -> None:
        if not state:
            return
        size = self.per_rank * self.world.size
        saved = state.get("batch_size", size)
        if saved != size:
            raise ForgeError(f"resume: this run's global micro-batch was {saved} rows, now it would be "
                             f"{self.per_rank} per rank x {self.world.size} rank(s) = {size}; resume with a world "
                             f"size that gives {saved} rows")
        self.order = fdata.BatchOrder.from_state(len(self.rows), size, state)

    def epoch(self) -> float:
        return float(self.order.epoch)

    def prepare_step(self, micro_batches: int) -> None:
        """Work a step needs from every rank before its first micro-batch (KTO's z0); most objectives: none."""

    def metric_means(self, sums: dict, count: float) -> dict:
        """The global batch's metric sums (floats) -> the logged values: means over the examples."""
        return {k: v / max(count, 1.0) for k, v in sums.items()}

    def eval_batches(self):
        """(start, stop) of this rank's validation batches: every world-size-th of all of them (or of the
        first train.eval_batches); the objective sums its results over ranks."""
        size = self.cfg.train.batch_size
        starts = list(range(0, len(self.valid), size))
        if self.cfg.train.eval_batches:
            starts = starts[: self.cfg.train.eval_batches]
        return [(s, min(s + size, len(self.valid))) for s in starts[self.world.rank::self.world.size]]


def exchange(world: World, sums: list[float], failed: BaseException | None, what: str) -> np.ndarray:
    """world.sum(sums), with every rank joining the one exchange even when its own part failed; then the failed
    rank re-raises its error and the others raise the matching one: MemoryError when it was out of memory (the
    loop stops every rank alike, with a checkpoint), else a ForgeError naming the rank (its own message is the
    real one)."""
    oom = failed is not None and MemoryGuard.is_oom(failed)
    flags = np.zeros(2 * world.size)
    if failed is not None:
        flags[2 * world.rank + (0 if oom else 1)] = 1.0
    totals = world.sum(list(sums) + flags.tolist())
    if failed is not None:
        raise failed
    got = totals[len(sums):]
    if got.any():
        ranks = ", ".join(str(r) for r in range(world.size) if got[2 * r] or got[2 * r + 1])
        if got[0::2].any():
            raise MemoryError(f"out of memory on rank {ranks} while {what}")
        raise ForgeError(f"rank {ranks} stopped with an error while {what} (its own message says what)")
    return totals[:len(sums)]


def load_split(load, cfg, tokenizer, console) -> tuple[list, list]:
    """(train rows, validation rows) with `load` (fdata.load_sft / load_preferences), each reported."""
    rows = _load_reported(load, cfg.data.train, cfg, tokenizer, console)
    valid = _load_reported(load, cfg.data.valid, cfg, tokenizer, console) if cfg.data.valid else []
    return rows, valid


def _load_reported(load, path, cfg, tokenizer, console) -> list:
    rows, stats = load(path, tokenizer, cfg.data, cfg.train.max_seq_len)
    console.print(f"{path}: {stats.summary()}")
    return rows
