"""The memory plan from the data: the widest real batch and the head's real positions, read with the loaders and
collates the objectives use; without data, the worst case (rows of max_seq_len, every position trained)."""

import json

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.config import ForgeConfig
from forge_core.data.tokenize import load_tokenizer
from forge_core.memory.data_shape import DataShape, data_shape
from forge_core.memory.estimate import ModelShape, attention_scores_bytes, block_token_bytes, make_run
from forge_core.memory.plan import plan_memory
from tests.conftest import write_jsonl


def _sft(n: int, answer: int, prompt: int = 20):
    # the tiny tokenizer is byte-level: one token per character, plus the ChatML template's tokens
    return [{"messages": [{"role": "user", "content": "q" * prompt}, {"role": "assistant", "content": "a" * answer}]}
            for _ in range(n)]


def _cfg(tiny_model, data, **train):
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train = str(tiny_model), str(data)
    cfg.train.batch_size, cfg.train.max_seq_len = 4, 256
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_data_shape_of_a_fixed_tiny_dataset(tiny_model, tmp_path):
    """20-char prompt, 30-char answer: ChatML makes each row 6 + 20 + 2 (user turn) + 11 + 30 + 2 (assistant turn)
    = 71 tokens, of which 31 are trained (the answer and <|im_end|>), so T = 70 padded up to 96 and the head runs
    at 31 positions per row."""
    path = write_jsonl(tmp_path / "fixed.jsonl", _sft(8, 30))
    shape = data_shape(_cfg(tiny_model, path), "sft", load_tokenizer(tiny_model))
    assert shape == DataShape(seq=96, head_per_row=31, rows=8, source=f"{path} (8 rows)")


def test_the_data_based_plan_pins_its_bytes(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "fixed.jsonl", _sft(8, 30))
    cfg = _cfg(tiny_model, path)
    model_config = json.loads((tiny_model / "config.json").read_text())
    data = data_shape(cfg, "sft", load_tokenizer(tiny_model))
    plan = plan_memory(cfg, model_config, "sft", "mlx", on_gpu=False, data=data)
    run = make_run(cfg, ModelShape.from_config(model_config), "sft", "mlx", False, data)
    shape = run.shape
    # the formula, by hand: B·T tokens through every block, the head at B x 31 loss positions, fp32
    assert (run.rows, run.seq, run.head_tokens) == (4, 96, 4 * 31)
    assert plan.component("activations") == shape.layers * 4 * 96 * block_token_bytes(run) + 4 * 96 * shape.hidden * 4
    # the chunked loss head: its working set is 18 fp32 copies of the 4 x 31 positions' logits (fewer than a chunk)
    block = 4 * 96 * block_token_bytes(run) + attention_scores_bytes(run, run.const["scores_backward"])
    assert plan.component("backward working set") == max(18 * 4 * 31 * shape.vocab * 4, block)
    assert plan.total_bytes == 343_154_432  # pinned: a change to any formula shows here
    worst = plan_memory(cfg, model_config, "sft", "mlx", on_gpu=False)
    assert worst.component("activations") > plan.component("activations")
    assert worst.total_bytes > plan.total_bytes


def test_long_rows_raise_the_plan(tiny_model, tmp_path):
    model_config = json.loads((tiny_model / "config.json").read_text())
    totals = []
    for answer in (30, 150):
        cfg = _cfg(tiny_model, write_jsonl(tmp_path / f"a{answer}.jsonl", _sft(8, answer)))
        data = data_shape(cfg, "sft", load_tokenizer(tiny_model))
        totals.append((data.seq, plan_memory(cfg, model_config, "sft", "mlx", on_gpu=False, data=data).total_bytes))
    (short_seq, short), (long_seq, long) = totals
    assert (short_seq, long_seq) == (96, 192)
    assert long > short


def test_pairs_plan_their_longer_completion_and_packing_plans_full_rows(tiny_model, tmp_path):
    tok = load_tokenizer(tiny_model)
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q" * 20, "chosen": "a" * 10, "rejected": "b" * 70}] * 4)
    shape = data_shape(_cfg(tiny_model, pairs), "dpo", tok)
    assert shape.head_per_row == 71 and shape.seq == 128  # 70 + <|im_end|>; 20 + template + 71 tokens -> 128
    cfg = _cfg(tiny_model, write_jsonl(tmp_path / "s.jsonl", _sft(16, 30)))
    cfg.data.packing = True
    packed = data_shape(cfg, "sft", tok)
    assert (packed.seq, packed.rows, packed.head_per_row) == (224, 6, 93)  # 3 rows of 71 tokens per sequence


def test_forge_memory_with_data_shows_both_plans(tiny_model, tmp_path):
    path = write_jsonl(tmp_path / "fixed.jsonl", _sft(8, 30))
    r = CliRunner().invoke(cli, ["memory", "--model", str(tiny_model), "--data", str(path), "--backend", "mlx",
                                 "--max-seq-len", "256", "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    assert "planned from the data" in r.output and "widest batch 96 tokens" in r.output
    assert "worst case (every row max_seq_len 256" in r.output
    r = CliRunner().invoke(cli, ["memory", "--model", str(tiny_model), "--backend", "mlx"])
    assert r.exit_code == 0 and "no data given: assumes rows of max_seq_len" in r.output.replace("\n", " ")


def test_the_memo_hands_the_objective_the_planners_rows(tiny_model, tmp_path):
    from forge_core import data as fdata

    path = write_jsonl(tmp_path / "fixed.jsonl", _sft(8, 30))
    tok, cfg = load_tokenizer(tiny_model), ForgeConfig()
    a, _ = fdata.load_sft(path, tok, cfg.data, 256)
    b, _ = fdata.load_sft(path, tok, cfg.data, 256)
    assert a is not b and all(x is y for x, y in zip(a, b))  # the same rows, in a fresh list
    write_jsonl(path, _sft(9, 30))  # the file changed: read again
    c, _ = fdata.load_sft(path, tok, cfg.data, 256)
    assert len(c) == 9


@pytest.mark.parametrize("kind", ["orpo", "kto"])
def test_every_method_plans_from_its_own_rows(tiny_model, tmp_path, kind):
    rows = [{"prompt": "q" * 20, "chosen": "a" * 10, "rejected": "b" * 30}] * 4
    shape = data_shape(_cfg(tiny_model, write_jsonl(tmp_path / "p.jsonl", rows)), kind, load_tokenizer(tiny_model))
    assert shape.rows == (8 if kind == "kto" else 4)
