"""The data pipeline: JSONL / local `datasets` dirs -> token ids + loss masks -> batches (numpy only).

    read_rows(path)                   rows.py           (file, line, row) from JSONL, a dir, a datasets dir
    load_sft / load_preferences       here              rows -> checked -> chat-templated -> truncated
    pack / BatchOrder / collate_*     batches.py        packing, resumable epoch order, padded batches
    load_tokenizer / ChatTokenizer    tokenize.py       assistant-only loss masks via the chat template
    held-out prompts + references     eval_rows.py      for generation metrics; the system prompt rows share

A bad row stops the run with `path:line: what is wrong`, or - with DataConfig.skip_bad_rows - is counted
in DataStats.skipped (first few reasons kept for a warning). transformers is imported only when a
tokenizer is loaded; `datasets` only for a datasets directory.
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forge_core.config import DataConfig
from forge_core.data.batches import (
    BatchOrder,
    PackedRow,
    PreferenceRow,
    PromptRow,
    TokenizedRow,
    UnpairedRow,
    add_loss_positions,
    collate_completions,
    collate_dpo,
    collate_sft,
    loss_row_cap,
    pack,
    shared_prefix,
    widest_batch,
)
from forge_core.data.rows import (
    RowProblem,
    iter_rows,
    parse_preference,
    parse_prompt,
    parse_sft,
    parse_unpaired,
    read_rows,
)
from forge_core.data.shapes import NAMES
from forge_core.data.tokenize import (
    ChatTokenizer,
    load_tokenizer,
    pad_token_id,
    truncate_preference,
    truncate_sft,
)
from forge_core.errors import ForgeError, located

__all__ = [
    "BatchOrder",
    "DataStats",
    "PackedRow",
    "PreferenceRow",
    "PromptRow",
    "TokenizedRow",
    "UnpairedRow",
    "add_loss_positions",
    "collate_completions",
    "collate_dpo",
    "collate_sft",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "load_tokenizer",
    "load_unpaired",
    "loss_row_cap",
    "pack",
    "pad_token_id",
    "read_rows",
    "shared_prefix",
    "source_key",
    "truncate_preference",
    "widest_batch",
]

MAX_REASONS = 5
_MEMO: dict = {}  # the last loads: the memory plan reads the data before training does (data_shape.py)


@dataclass
class DataStats:
    rows: int = 0  # rows kept
    truncated: int = 0  # kept rows cut to max_seq_len
    skipped: int = 0  # bad rows dropped (skip_bad_rows)
    split_pairs: int = 0  # preference pairs read as two unpaired rows (KTO)
    reasons: list[str] = field(default_factory=list)  # the first MAX_REASONS skip reasons, `path:line: what`
    shapes: dict[str, int] = field(default_factory=dict)  # rows read per shape (shapes.py): messages, ShareGPT...

    def summary(self) -> str:
        """e.g. '200 rows, 3 truncated to max_seq_len, 1 skipped (path:line: why); read as ShareGPT 150, messages 50'
        - what a run prints per source."""
        parts = [f"{self.rows} rows" + (f" ({self.split_pairs} pairs split in two)" if self.split_pairs else "")]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_seq_len")
        if self.skipped:
            parts.append(f"{self.skipped} skipped ({'; '.join(self.reasons[:3])})")
        shapes = ", ".join(f"{NAMES.get(k, k)} {n}" for k, n in sorted(self.shapes.items(), key=lambda kv: -kv[1]))
        return ", ".join(parts) + (f"; read as {shapes}" if shapes else "")


def _load(path, data_cfg: DataConfig, build) -> tuple[list, DataStats]:
    """Run `build(row) -> (item, truncated?)` over every row, stopping or skipping on RowProblem."""
    items, stats = [], DataStats()
    for file, line, row in iter_rows(path, data_cfg):
        try:
            if isinstance(row, RowProblem):
                raise row
            item, cut = build(row)  # one item, or a list (a KTO pair split in two)
            shape = getattr(row, "shape", "other")
            stats.shapes[shape] = stats.shapes.get(shape, 0) + 1
        except RowProblem as e:
            where = located(file, line, str(e))
            if not data_cfg.skip_bad_rows:
                raise ForgeError(where) from None
            stats.skipped += 1
            if len(stats.reasons) < MAX_REASONS:
                stats.reasons.append(where)
            continue
        more = item if isinstance(item, list) else [item]
        for one in more:
            if isinstance(one, PromptRow):  # reward errors name the row
                one.where = f"{file}:{line}"
        items.extend(more)
        stats.rows += len(more)
        stats.truncated += int(cut)
    if not items:
        first = f"; first problem: {stats.reasons[0]}" if stats.reasons else ""
        raise ForgeError(f"{path}: no usable rows ({stats.skipped} skipped{first})")
    return items, stats


def source_key(path) -> tuple:
    """What a data source's rows depend on: the spec itself (a Hub id, `dir@split`...) and, on disk, every file's
    path, size and mtime."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
    return (str(path), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _memo(load):
    """Remember a loader's last results per (source on disk, tokenizer, data config, max_seq_len), so the memory
    plan and the objective tokenize a dataset once. Cleared as it fills; rows are never mutated downstream."""

    @functools.wraps(load)
    def wrapper(path, tokenizer, data_cfg: DataConfig, max_seq_len: int, *more):
        key = (load.__name__, source_key(path), getattr(tokenizer, "name_or_path", id(tokenizer)),
               len(tokenizer), repr(data_cfg), max_seq_len, *more)
        if key not in _MEMO:
            if len(_MEMO) >= 8:
                _MEMO.clear()
            _MEMO[key] = load(path, tokenizer, data_cfg, max_seq_len, *more)
        rows, stats = _MEMO[key]
        return list(rows), copy.deepcopy(stats)

    return wrapper


def _check_system(chat: ChatTokenizer, data_cfg: DataConfig) -> None:
    if data_cfg.system_prompt and not chat.has_template:
        raise ForgeError("data.system_prompt is set but the tokenizer has no chat template to put it in")


@_memo
def load_sft(path, tokenizer, data_cfg: DataConfig, max_seq_len: int) -> tuple[list[TokenizedRow], DataStats]:
    """SFT rows -> TokenizedRow(tokens int32 (L,), mask bool (L,)) with L <= max_seq_len.

    mask = assistant content + end-of-turn tokens (all tokens with data_cfg.train_on_prompt); see
    tokenize.py for how turns are located. Packing is a separate step: `pack(rows, max_seq_len)`.
    """
    chat = ChatTokenizer(tokenizer)
    _check_system(chat, data_cfg)

    def build(row):
        ex = parse_sft(row, data_cfg.system_prompt, data_cfg.columns)
        tokens, mask, cut = truncate_sft(*chat.sft(ex, data_cfg.train_on_prompt), max_seq_len)
        return TokenizedRow(tokens, mask), cut

    return _load(path, data_cfg, build)


@_memo
def load_preferences(path, tokenizer, data_cfg: DataConfig, max_seq_len: int) -> tuple[list[PreferenceRow], DataStats]:
    """Preference rows -> PreferenceRow(prompt, chosen, rejected) with len(prompt) + len(longer) <= max_seq_len.

    Truncation cuts the prompt from the left first, then the completions from the right (truncate_preference).
    """
    chat = ChatTokenizer(tokenizer)
    _check_system(chat, data_cfg)

    def build(row):
        ex = parse_preference(row, data_cfg.system_prompt, data_cfg.columns)
        p, c, r, cut = truncate_preference(*chat.preference(ex), max_seq_len)
        _check_distinct(c, r, cut, max_seq_len)
        return PreferenceRow(p, c, r), cut

    return _load(path, data_cfg, build)


def _check_distinct(chosen, rejected, cut: bool, max_seq_len: int) -> None:
    """A pair whose two completions are the same tokens teaches nothing (every pairwise loss is flat there)."""
    if np.array_equal(chosen, rejected):
        why = f" after truncation to max_seq_len={max_seq_len}" if cut else ""
        raise RowProblem(f"chosen and rejected are identical{why}: nothing to prefer "
                         "(fix the row, or set data.skip_bad_rows to skip such rows)")


@_memo
def load_unpaired(path, tokenizer, data_cfg: DataConfig, max_seq_len: int) -> tuple[list[UnpairedRow], DataStats]:
    """KTO rows -> UnpairedRow(prompt, completion, label, pair); a {prompt, chosen, rejected} row becomes two rows
    (chosen desirable, rejected undesirable) that remember their pair for held-out pairwise accuracy."""
    chat = ChatTokenizer(tokenizer)
    _check_system(chat, data_cfg)
    pair_ids = itertools.count()

    def build(row):
        examples = parse_unpaired(row, data_cfg.system_prompt, data_cfg.columns)
        if len(examples) == 2:  # a pair: tokenized and truncated together, as the preference loader does
            good, bad = examples
            answers = chat.answers(good.prompt, good.system, (good.completion, bad.completion))
            p, c, r, cut = truncate_preference(*answers, max_seq_len)
            _check_distinct(c, r, cut, max_seq_len)
            k = next(pair_ids)
            return [UnpairedRow(p, c, True, k), UnpairedRow(p, r, False, k)], cut
        ex = examples[0]
        prompt, completion = chat.unpaired(ex)
        p, c, _, cut = truncate_preference(prompt, completion, completion, max_seq_len)
        return [UnpairedRow(p, c, ex.label)], cut

    rows, stats = _load(path, data_cfg, build)
    stats.split_pairs = sum(1 for r in rows if r.pair >= 0 and r.label)
    return rows, stats


@_memo
def load_prompts(path, tokenizer, data_cfg: DataConfig, max_seq_len: int, max_new_tokens: int = 0) -> tuple[list[PromptRow], DataStats]:
    """GRPO's prompt-only rows {prompt (string or messages), ...other columns} -> PromptRow (an SFT row {messages}
    is read as its conversation up to the last answer, with that answer as the `reference` column): the prompt rendered
    with the generation prompt (a string prompt without a chat template: tokenized as it is), cut from the LEFT to
    max_seq_len - max_new_tokens so that its sampled completions fit (TRL's max_prompt_length cuts the same side)."""
    chat = ChatTokenizer(tokenizer)
    _check_system(chat, data_cfg)
    room = max_seq_len - max_new_tokens
    if room < 1:
        raise ForgeError(f"train.max_seq_len {max_seq_len} leaves no room for a prompt before grpo.max_new_tokens "
                         f"{max_new_tokens}; raise train.max_seq_len")

    def build(row):
        if "messages" in row and "prompt" not in row:  # an SFT conversation: its last answer is the reference
            prompt, answer = parse_sft(row, data_cfg.system_prompt, data_cfg.columns).last_answer()
            row = {"prompt": prompt, "reference": answer, **{k: v for k, v in row.items() if k != "messages"}}
        messages, columns = parse_prompt(row, data_cfg.system_prompt, data_cfg.columns)
        given = row.get("prompt")
        if chat.has_template:
            ids = chat.answers(messages, "", ())[0]
        elif isinstance(given, str) and len(messages) == 1:
            ids = np.asarray(chat._encode(given, True), np.int32)
        else:
            raise RowProblem("the tokenizer has no chat template: give 'prompt' as a string without a system "
                             "message, or use a model with a chat template")
        cut = len(ids) > room
        return PromptRow(np.asarray(ids[-room:], np.int32), given, columns, ""), cut

    return _load(path, data_cfg, build)
