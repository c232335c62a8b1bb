"""What the loop optimises: data + loss + eval for SFT and for DPO, behind one small interface.

    obj.loss_fn(model, batch) -> (loss sum, count, {metric: sum})
    obj.next_batch() -> dict of mx arrays        obj.evaluate() -> {metric: mean}
    obj.state() / obj.restore(state)             the data position, for exact resume
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import numpy as np

from forge_core import data as fdata
from forge_core.loop import ObjectiveBase, eval_batch_starts, report_data

from .losses import dpo_loss, sequence_logps, sft_loss


def _mx(batch: dict) -> dict:
    return {k: mx.array(v) for k, v in batch.items()}


def _hf_tokenizer(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def _pad_id(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


class SFTObjective(ObjectiveBase):
    kind = "sft"

    def __init__(self, cfg, model, tokenizer, console):
        tok = _hf_tokenizer(tokenizer)
        rows, stats = fdata.load_sft(cfg.data.train, tok, cfg.data, cfg.train.max_seq_len)
        report_data(console, cfg.data.train, stats)
        if cfg.data.packing:
            from .packing import enable_packing

            enable_packing(model)
            packed = fdata.pack(rows, cfg.train.max_seq_len)
            console.print(f"packed {len(rows)} rows into {len(packed)} sequences of <= {cfg.train.max_seq_len} tokens")
            rows = packed
        super().__init__(cfg, rows)
        self.valid = []
        if cfg.data.valid:
            self.valid, vstats = fdata.load_sft(cfg.data.valid, tok, cfg.data, cfg.train.max_seq_len)
            report_data(console, cfg.data.valid, vstats)
        self.pad, self.model = _pad_id(tok), model
        self.cap = fdata.loss_row_cap(self.rows + self.valid)  # one head size per batch width (head.py)
        self.loss_fn = lambda m, b: (*sft_loss(m, b), {})
        self._eval = mx.compile(lambda b: sft_loss(model, b), inputs=[model.state])

    def batch(self, rows) -> dict:
        """Rows -> an mx batch; the loss-position index lets the head run on trained tokens only (head.py)."""
        b = fdata.collate_sft(rows, self.pad, max_len=self.cfg.train.max_seq_len)
        return _mx(fdata.add_loss_positions(b, self.cap))

    def next_batch(self):
        return self.batch([self.rows[i] for i in self.order.next_batch()])

    def evaluate(self) -> dict:
        if not self.valid:
            return {}
        self.model.eval()
        size = self.cfg.train.batch_size
        total, count = 0.0, 0.0
        for s in eval_batch_starts(len(self.valid), size, self.cfg.train.eval_batches):
            ls, c = self._eval(self.batch(self.valid[s:s + size]))
            total, count = total + ls.item(), count + c.item()
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}


class DPOObjective(ObjectiveBase):
    """DPO against the policy at initialisation, whose log-probs are computed once before training.

    For PiSSA the policy at init is W_res + s·B0A0 (= the original model), not the adapter-off model
    W_res; continuing from an SFT adapter it is that adapter. Either way it is exactly the model built
    before the first step, so we score the data with it and never keep a second copy of the weights.
    """

    kind = "dpo"

    def __init__(self, cfg, model, tokenizer, run, console):
        tok = _hf_tokenizer(tokenizer)
        rows, stats = fdata.load_preferences(cfg.data.train, tok, cfg.data, cfg.train.max_seq_len)
        report_data(console, cfg.data.train, stats)
        super().__init__(cfg, rows)
        self.valid = []
        if cfg.data.valid:
            self.valid, vstats = fdata.load_preferences(cfg.data.valid, tok, cfg.data, cfg.train.max_seq_len)
            report_data(console, cfg.data.valid, vstats)
        self.pad, self.model = _pad_id(tok), model
        self.cap = fdata.loss_row_cap(self.rows + self.valid)
        d = cfg.dpo
        self.loss_fn = partial(dpo_loss, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                               sft_weight=d.sft_weight)
        self.ref, self.ref_valid = self._reference(run, console)
        self._eval = mx.compile(lambda b: self.loss_fn(model, b), inputs=[model.state])

    def _collate(self, rows, ref: np.ndarray, idx) -> dict:
        b = fdata.add_loss_positions(fdata.collate_dpo(rows, self.pad), self.cap)
        b["ref_logps"] = np.concatenate([ref[idx, 0], ref[idx, 1]]).astype(np.float32)
        return _mx(b)

    def _score(self, rows) -> np.ndarray:
        """(N, 2) chosen/rejected sequence log-probs of the current model, in row order."""
        self.model.eval()
        fn = mx.compile(partial(sequence_logps, self.model))
        size, out = self.cfg.train.batch_size, []
        for s in range(0, len(rows), size):
            chunk = rows[s:s + size]
            lp = np.array(fn(_mx(fdata.add_loss_positions(fdata.collate_dpo(chunk, self.pad), self.cap))))
            out.append(np.stack([lp[:len(chunk)], lp[len(chunk):]], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), np.float32)

    def _reference(self, run, console):
        from safetensors.numpy import load_file

        from forge_core.atomic import save_safetensors

        f = run.file("reference_logps.safetensors")
        if f.is_file():
            cached = load_file(str(f))
            if cached["train"].shape[0] == self.n_rows and cached["valid"].shape[0] == len(self.valid):
                return cached["train"], cached["valid"]
        console.print(f"scoring {self.n_rows + len(self.valid)} pairs with the reference (policy at init)...")
        ref = {"train": self._score(self.rows), "valid": self._score(self.valid)}
        save_safetensors(f, ref)
        return ref["train"], ref["valid"]

    def next_batch(self):
        idx = np.array(self.order.next_batch())
        return self._collate([self.rows[i] for i in idx], self.ref, idx)

    def evaluate(self) -> dict:
        if not self.valid:
            return {}
        self.model.eval()
        size, sums, n = self.cfg.train.batch_size, {}, 0.0
        for s in eval_batch_starts(len(self.valid), size, self.cfg.train.eval_batches):
            idx = np.arange(s, min(s + size, len(self.valid)))
            loss, c, metrics = self._eval(self._collate(self.valid[s:s + size], self.ref_valid, idx))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += c.item()
        return {k: v / max(n, 1) for k, v in sums.items()}


def build(kind: str, cfg, model, tokenizer, run, console):
    if kind == "sft":
        return SFTObjective(cfg, model, tokenizer, console)
    if kind == "dpo":
        return DPOObjective(cfg, model, tokenizer, run, console)
    raise ValueError(kind)
