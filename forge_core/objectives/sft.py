"""Supervised fine-tuning: token-mean NLL over the trained (assistant) tokens."""

from __future__ import annotations

import math

from forge_core import data as fdata
from forge_core.distributed import World
from forge_core.objectives.base import Objective, load_split


class SFTObjective(Objective):
    kind = "sft"

    def __init__(self, kind, cfg, ops, model, tokenizer, run, console, world: World):
        rows, valid = load_split(fdata.load_sft, cfg, ops.hf_tokenizer(tokenizer), console)
        if cfg.data.packing:
            ops.enable_packing(model)
            packed = fdata.pack(rows, cfg.train.max_seq_len)
            console.print(f"packed {len(rows)} rows into {len(packed)} sequences of <= {cfg.train.max_seq_len} tokens")
            rows = packed
        super().__init__(cfg, ops, model, tokenizer, rows, valid, world)
        # the loss SUM and the token count: the stepper divides by the count over all micro-batches,
        # so gradient accumulation equals one big batch exactly
        self.loss_fn = lambda m, b: (*ops.sft_loss(m, b), {})
        self._eval = ops.no_grad(model, lambda b: ops.sft_loss(model, b))

    def batch(self, rows) -> dict:
        b = fdata.collate_sft(rows, self.pad, max_len=self.cfg.train.max_seq_len)
        return self.ops.to_batch(self.model, fdata.add_loss_positions(b, self.cap))

    def next_batch(self):
        return self.batch([self.rows[i] for i in self.next_indices()])

    def evaluate(self) -> dict:
        if not self.valid:
            return {}
        self.model.eval()
        total = count = 0.0
        for start, stop in self.eval_batches():
            loss_sum, n = self._eval(self.batch(self.valid[start:stop]))
            total, count = total + loss_sum.item(), count + n.item()
        total, count = self.world.sum([total, count])  # every rank evaluated its share of the batches
        loss = float(total / max(count, 1))
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}
