"""`forge generate` / `forge eval` on MLX: the CPU fold-in keeps the trained model's outputs, batched greedy
answers equal the one-row answers, the held-out loss equals the training path's."""

import io
import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from rich.console import Console

from forge_core.eval.generation import answers
from forge_mlx.generate import complete, for_inference
from forge_mlx.lora import LoRALinear
from forge_mlx.quant import QuantLinear
from tests.forge_mlx.run import evaluate, generate, load_adapted, train
from tests.forge_mlx.test_trainer import _cfg, _rows

pytestmark = pytest.mark.mlx


SYSTEM = "Answer with two colour words."


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    data = tmp / "train.jsonl"
    rows = [{"messages": [{"role": "system", "content": SYSTEM}, *r["messages"]]} for r in _rows(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tiny_model, data, tmp / "run", steps=6, lr=2e-2)
    cfg.quant.bits = 4
    cfg.data.valid = str(data)
    return cfg, train(cfg, console=Console(file=io.StringIO()))


def test_for_inference_keeps_the_outputs_of_the_quantized_adapted_model(run):
    _, out = run
    model, _, _ = load_adapted(str(out))
    tokens = mx.array([[5, 70, 71, 72, 100, 3, 9, 200]])
    before = model(tokens)
    assert any(isinstance(m, QuantLinear) for _, m in model.named_modules())
    for_inference(model)
    assert not any(isinstance(m, (QuantLinear, LoRALinear)) for _, m in model.named_modules())
    np.testing.assert_allclose(np.array(model(tokens)), np.array(before), atol=1e-4)


@pytest.mark.parametrize("system", ["", SYSTEM])
def test_batched_greedy_answers_equal_the_one_row_answers(run, system):
    from forge_core.data import shared_prefix
    from forge_core.eval.generation import chat_prompt
    from forge_mlx import ops

    _, out = run
    model, tok, _ = load_adapted(str(out))
    for_inference(model)
    prompts = ["color 3", "a much longer prompt than the others, to make left padding", "color 10", "color 3"]
    convs = [([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
             for p in prompts]
    # with the shared system prompt, the batch starts from one cached prefix (the path forge eval takes)
    assert (shared_prefix([chat_prompt(tok._tokenizer, c) for c in convs]) > 0) == bool(system)
    one = [complete(model, tok, c, 10) for c in convs]
    assert answers(ops, model, tok, convs, 10, batch_size=3) == one
    assert len(set(one)) > 1 and all(one)


def test_evaluate_scores_batched_answers_and_the_loss_of_the_training_path(run):
    from forge_core import data as fdata
    from forge_core.data.eval_rows import prompts_and_references
    from forge_core.eval.metrics import score_rows
    from forge_mlx import ops

    cfg, out = run
    cfg.eval.metric, cfg.eval.limit, cfg.eval.max_new_tokens, cfg.eval.batch_size = "exact", 5, 8, 2
    result = evaluate(cfg, adapter=str(out))
    # the loss as training computes it: packed weights, adapter apart, rows in file order, the full head
    model, tok, _ = load_adapted(str(out))
    rows, _ = fdata.load_sft(cfg.data.valid, tok._tokenizer, cfg.data, cfg.train.max_seq_len)
    loss_sum, n = ops.sft_loss(model, ops.to_batch(model, fdata.collate_sft(rows, fdata.pad_token_id(tok._tokenizer))))
    assert result["loss"] == pytest.approx(loss_sum.item() / n.item(), abs=1e-4)
    assert result["tokens"] == int(n.item()) > 0 and result["examples"] == 5
    # the task metric of one-row answers
    for_inference(model)
    pairs = prompts_and_references(cfg.data.valid, cfg.data)[:5]
    one = [complete(model, tok, msgs, 8) for msgs, _ in pairs]
    assert result["exact"] == score_rows(one, [ref for _, ref in pairs], metric="exact")["exact"]


def test_the_run_remembers_its_system_prompt_and_generate_uses_it(run, capsys):
    _, out = run
    meta = json.loads((out / "adapter" / "forge.json").read_text())
    assert meta["system_prompt"] == SYSTEM  # every training row had it
    model, tok, _ = load_adapted(str(out))
    for_inference(model)
    user = {"role": "user", "content": "color 3"}
    taught = complete(model, tok, [{"role": "system", "content": SYSTEM}, user], 12)
    bare = complete(model, tok, [user], 12)
    assert taught != bare  # the system prompt changes the answer of this model
    capsys.readouterr()
    assert generate(adapter=str(out), prompt="color 3", max_tokens=12) == taught
    said = capsys.readouterr()
    assert SYSTEM in said.err and said.out == taught + "\n"  # stdout is the streamed answer, whole
    assert generate(adapter=str(out), prompt="color 3", max_tokens=12, system="") == bare


def test_a_run_without_a_shared_system_prompt_records_none(tiny_model, tmp_path):
    rows = _rows(8)
    rows[0] = {"messages": [{"role": "system", "content": "only one row has this"}, *rows[0]["messages"]]}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train(_cfg(tiny_model, data, tmp_path / "run", steps=1), console=Console(file=io.StringIO()))
    assert json.loads((out / "adapter" / "forge.json").read_text())["system_prompt"] == ""
