"""Fuzzing the row reader and parser: any file content ends in rows or in ForgeError, never another exception."""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from forge_core.config import DataConfig
from forge_core.data import load_preferences, load_sft, load_tokenizer, read_rows
from forge_core.errors import ForgeError
from tests.tiny import make_tokenizer

FUZZ = settings(max_examples=60, deadline=None)


@lru_cache(maxsize=1)
def tokenizer():
    d = Path(tempfile.mkdtemp(prefix="forge-fuzz-tok-"))
    make_tokenizer(d)
    return load_tokenizer(d)


scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
           | st.text(max_size=12) | st.sampled_from(["\ud800", "user", "assistant", "system", "bot", ""]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", 3, None])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=10) | json_values}),
                    max_size=4) | json_values
# near-valid rows (the field names we read, mostly valid values), so the fuzzer also reaches the template,
# the masks and truncation - not only "missing field"
texts = st.text(max_size=30) | st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", "\ud800", " \n", ""])
good_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": texts}), min_size=1, max_size=4)
field_values = good_messages | texts | messages
answer = texts | st.lists(st.fixed_dictionaries({"role": st.just("assistant"), "content": texts}), min_size=1, max_size=1)
optional_system = {"system": texts | json_values}
sft_rows = (st.fixed_dictionaries({"messages": good_messages}, optional=optional_system)
            | st.fixed_dictionaries({"prompt": texts, "completion": texts}, optional=optional_system)
            | st.fixed_dictionaries({"text": texts}))
preference_rows = st.fixed_dictionaries({"prompt": texts | good_messages, "chosen": answer, "rejected": answer},
                                        optional=optional_system)
plausible = st.fixed_dictionaries({}, optional={k: field_values for k in
                                                ["messages", "prompt", "completion", "text", "chosen", "rejected",
                                                 "system"]})
rows = sft_rows | preference_rows | plausible | json_values


def write(lines: list[bytes]) -> Path:
    path = Path(tempfile.mkdtemp(prefix="forge-fuzz-")) / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


def only_forge_errors(fn, *args) -> None:
    try:
        fn(*args)
    except ForgeError as e:
        assert "\n" not in str(e)  # one line for the user


@FUZZ
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_random_bytes_give_rows_or_forge_error(lines):
    path = write(lines)
    only_forge_errors(read_rows, path)
    only_forge_errors(load_sft, path, tokenizer(), DataConfig(), 64)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=4), st.booleans())
def test_random_json_rows_give_rows_or_forge_error(values, train_on_prompt):
    path = write([json.dumps(v).encode() for v in values])
    only_forge_errors(load_sft, path, tokenizer(), DataConfig(train_on_prompt=train_on_prompt), 48)
    only_forge_errors(load_preferences, path, tokenizer(), DataConfig(), 48)


@FUZZ
@given(st.lists(rows, min_size=1, max_size=4))
def test_skip_bad_rows_accounts_for_every_line(values):
    path = write([json.dumps(v).encode() for v in values])
    cfg = DataConfig(skip_bad_rows=True)
    try:
        kept, stats = load_sft(path, tokenizer(), cfg, 48)
    except ForgeError as e:
        assert "no usable rows" in str(e)
        return
    assert stats.rows == len(kept) and stats.rows + stats.skipped == len(values)
    assert len(stats.reasons) == min(stats.skipped, 5)
    assert all(r.mask.any() and len(r.tokens) <= 48 for r in kept)
