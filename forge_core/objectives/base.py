"""What every objective shares: its rows, a resumable seeded batch order, and how validation is batched.

An objective is what the loop optimises (forge_core/train.py):
    obj.loss_fn(model, batch) -> (loss SUM, count, {metric: sum})    tensor math via the backend's ops
    obj.next_batch() -> framework batch     obj.evaluate() -> {metric: mean over the validation rows}
    obj.state() / obj.restore(state)        the data position, for exact resume
"""

from __future__ import annotations

from forge_core import data as fdata


class Objective:
    kind = ""

    def __init__(self, cfg, ops, model, tokenizer, rows: list, valid: list):
        self.cfg, self.ops, self.model = cfg, ops, model
        self.rows, self.valid, self.n_rows = rows, valid, len(rows)
        self.pad = fdata.pad_token_id(ops.hf_tokenizer(tokenizer))
        # the most trained tokens in any row, so every batch of a width pads its loss positions to one
        # size: one compiled shape per batch width (forge_mlx/head.py runs the head at those positions)
        self.cap = fdata.loss_row_cap(rows + valid)
        self.order = fdata.BatchOrder(len(rows), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)

    def state(self) -> dict:
        return self.order.state()

    def restore(self, state: dict | None) -> None:
        if state:
            self.order = fdata.BatchOrder.from_state(self.n_rows, self.cfg.train.batch_size, state)

    def epoch(self) -> float:
        return float(self.order.epoch)

    def eval_batches(self):
        """(start, stop) of each validation batch: all of them, or the first train.eval_batches."""
        size = self.cfg.train.batch_size
        starts = list(range(0, len(self.valid), size))
        if self.cfg.train.eval_batches:
            starts = starts[: self.cfg.train.eval_batches]
        return [(s, min(s + size, len(self.valid))) for s in starts]


def load_split(load, cfg, tokenizer, console) -> tuple[list, list]:
    """(train rows, validation rows) with `load` (fdata.load_sft / load_preferences), each reported."""
    rows = _load_reported(load, cfg.data.train, cfg, tokenizer, console)
    valid = _load_reported(load, cfg.data.valid, cfg, tokenizer, console) if cfg.data.valid else []
    return rows, valid


def _load_reported(load, path, cfg, tokenizer, console) -> list:
    rows, stats = load(path, tokenizer, cfg.data, cfg.train.max_seq_len)
    msg = f"{path}: {stats.rows} rows"
    if stats.truncated:
        msg += f", {stats.truncated} truncated to max_seq_len"
    if stats.skipped:
        msg += f", {stats.skipped} skipped ({'; '.join(stats.reasons[:3])})"
    console.print(msg)
    return rows
