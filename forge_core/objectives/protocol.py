"""What the loop (forge_core/train.py) needs of an objective - all of it. Every registered method's objective
class satisfies this (tests/forge_core/test_objective_contract.py checks the members and their parameters), and a
new method's objective only has to: objectives/base.py's Objective gives the data order, resume and eval batching.

Every objective is built the same way: cls(kind, cfg, ops, model, tokenizer, run, console, world) (objectives.build).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Objective(Protocol):
    kind: str  # the method (forge_core/methods.py)
    # what one epoch trains on, in rows of one micro-batch each (train.epochs counts these): the training rows;
    # GRPO: prompts x num_generations x num_iterations (each completion trains num_iterations steps)
    n_rows: int
    global_micro_batch: int  # rows per micro-batch over all ranks (train.batch_size x ranks)
    # (model, framework batch) -> (loss SUM, count, {metric: sum}): the stepper divides by the count over all
    # micro-batches and ranks, so accumulation and data-parallel equal one big batch
    loss_fn: Callable[[Any, dict], tuple]

    def next_batch(self) -> dict:
        """This rank's next micro-batch, as framework arrays."""

    def prepare_step(self, micro_batches: int) -> None:
        """Work a step needs from every rank before its first micro-batch (KTO's z0; GRPO's generation)."""

    def state(self) -> dict:
        """The data position, JSON-serializable, for a checkpoint."""

    def checkpoint_arrays(self, state: dict) -> dict:
        """Arrays a checkpoint at `state` must hold besides it (GRPO: the generation still trained on)."""

    def restore(self, state: dict | None, arrays: dict | None = None) -> None:
        """Go on from a checkpoint's state() and arrays: the next batches are those the run would have had."""

    def evaluate(self) -> dict:
        """{metric: mean over the validation rows} ({} without them); every rank joins."""

    def epoch(self) -> float: ...

    def metric_means(self, sums: dict, count: float) -> dict:
        """The global batch's metric sums -> the logged values."""
