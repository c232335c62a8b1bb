"""What the training data makes of a batch, for the memory plan: the widest micro-batch's T and how many
positions per row the vocabulary head runs at - read by the same loaders and collates the objectives use.

Without data the plan assumes every row is max_seq_len long and trained at every position (the worst case);
with it, a run on rows of ≤ 130 tokens whose answers are 40 tokens is planned as exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from forge_core import data as fdata
from forge_core.config import ForgeConfig
from forge_core.methods import method


@dataclass(frozen=True)
class DataShape:
    seq: int  # T of the widest micro-batch (tokens, padded as the collates pad)
    head_per_row: int  # positions per row the loss needs logits at (the most trained tokens of any row, <= seq)
    rows: int  # training rows (pairs, or unpaired rows) after packing / splitting
    source: str  # what was read, for the plan's notes


LOADERS = {"sft": fdata.load_sft, "pairs": fdata.load_preferences, "unpaired": fdata.load_unpaired}


def loader(kind: str):
    """The objective's loader for a method's rows (methods.py: rows)."""
    return LOADERS[method(kind).rows]


def _grpo_shape(cfg: ForgeConfig, tokenizer) -> DataShape:
    """GRPO trains on prompts + completions it samples: the widest prompt + max_new_tokens + the end-of-turn token
    (as the collate pads it), the head at the completion tokens only."""
    new = cfg.grpo.max_new_tokens
    rows, _ = fdata.load_prompts(cfg.data.train, tokenizer, cfg.data, cfg.train.max_seq_len, new)
    valid = fdata.load_prompts(cfg.data.valid, tokenizer, cfg.data, cfg.train.max_seq_len, new)[0] if cfg.data.valid else []
    longest = max(len(r.prompt) for r in rows + valid)
    seq = fdata.collate_completions([(np.zeros(longest, np.int32), np.zeros(new + 1, np.int32))], 0)["inputs"].shape[1]
    return DataShape(seq=seq, head_per_row=new + 1, rows=len(rows),
                     source=f"{cfg.data.train} ({len(rows)} prompts, completions of <= {new} tokens)")


def data_shape(cfg: ForgeConfig, kind: str, tokenizer) -> DataShape:
    """DataShape of cfg.data.train (+ data.valid: evaluation batches go through the same model) for `kind`."""
    rows_of = method(kind).rows
    if rows_of == "prompts":
        return _grpo_shape(cfg, tokenizer)
    load = loader(kind)
    rows, _ = load(cfg.data.train, tokenizer, cfg.data, cfg.train.max_seq_len)
    valid = load(cfg.data.valid, tokenizer, cfg.data, cfg.train.max_seq_len)[0] if cfg.data.valid else []
    n = len(rows)
    packed = rows_of == "sft" and cfg.data.packing
    if packed:
        rows = fdata.pack(rows, cfg.train.max_seq_len)
    every = rows + valid
    seq = fdata.widest_batch(every, cfg.train.max_seq_len if rows_of == "sft" else None)
    head = min(seq, fdata.loss_row_cap(every))
    return DataShape(seq=seq, head_per_row=head, rows=len(rows),
                     source=f"{cfg.data.train} ({n} rows{', packed' if packed else ''})")
