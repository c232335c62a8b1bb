"""`forge generate` / `forge eval` on the torch backend: adapter reload, CPU fold-in, greedy decoding (one row
and batched), metrics."""

import io

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from rich.console import Console

from forge_core.eval.generation import answers
from forge_cuda.generate import complete, for_inference
from forge_cuda.lora import LoRALinear
from forge_cuda.quant import is_quantized
from tests.forge_cuda.run import (
    evaluate,
    evaluate_preferences,
    generate,
    heldout_loss,
    load_adapted,
    train,
)

pytestmark = pytest.mark.cuda


@pytest.fixture
def sft_run(make_cfg, sft_file):
    cfg = make_cfg(sft_file, quant__bits=4, train__steps=3, train__lr=2e-2)
    cfg.data.valid = str(sft_file)
    return cfg, train(cfg, console=Console(file=io.StringIO()))


def test_for_inference_keeps_the_quantized_values_and_the_adapter(sft_run):
    _, run = sft_run
    model, _, _ = load_adapted(str(run))
    assert any(is_quantized(m) for m in model.modules())
    tokens = torch.tensor([[5, 70, 71, 72, 100, 3, 9, 200]])
    model.eval()
    with torch.no_grad():
        before = model(input_ids=tokens).logits
        for_inference(model)
        after = model(input_ids=tokens).logits
    assert not any(is_quantized(m) or isinstance(m, LoRALinear) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_generate_streams_the_same_text_it_returns(sft_run, capsys):
    _, run = sft_run
    text = generate(adapter=str(run), prompt="say fig", max_tokens=12)
    out = capsys.readouterr().out
    assert out == text + "\n"
    model, tok, _ = load_adapted(str(run))
    for_inference(model)
    greedy = complete(model, tok, [{"role": "user", "content": "say fig"}], 12)
    assert greedy == text  # temp 0 is deterministic; streaming does not change it


def test_batched_greedy_answers_equal_the_one_row_answers(sft_run):
    _, run = sft_run
    model, tok, _ = load_adapted(str(run))
    for_inference(model)
    prompts = ["say fig", "a much longer prompt than the others, to make left padding", "kiwi", "say fig"]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    one = [complete(model, tok, c, 10) for c in convs]
    from forge_cuda import ops

    assert answers(ops, model, tok, convs, 10, batch_size=3) == one
    assert len(set(one)) > 1  # the rows differ: a row's answer is its own


def test_generate_without_adapter_uses_the_base(tiny_model, capsys):
    text = generate(model=str(tiny_model), prompt="hi", max_tokens=5)
    assert isinstance(text, str) and capsys.readouterr().out.endswith("\n")


def test_evaluate_reports_heldout_loss_and_the_task_metric(sft_run):
    cfg, run = sft_run
    cfg.eval.metric, cfg.eval.limit, cfg.eval.max_new_tokens = "exact", 2, 8
    result = evaluate(cfg, adapter=str(run))
    model, tok, _ = load_adapted(str(run))
    direct = heldout_loss(model, tok, cfg, cfg.data.valid)
    assert result["loss"] == pytest.approx(direct["loss"], abs=1e-4)  # densified == packed weights
    assert result["tokens"] == direct["tokens"] > 0
    # byte tokens: 8 new tokens are at most 8 characters, shorter than "apple apple apple" and "pear pear pear"
    assert result["metric"] == "exact" and result["examples"] == 2 and result["exact"] == 0.0


def test_evaluate_preferences_rises_after_dpo(make_cfg, dpo_file):
    cfg = make_cfg(dpo_file, quant__bits=4, train__steps=6, train__lr=1e-2)
    before = evaluate_preferences(cfg)  # the base model alone
    run = train(cfg, kind="dpo", console=Console(file=io.StringIO()))
    after = evaluate_preferences(cfg, adapter=str(run))
    assert before["pairs"] == after["pairs"] == 8
    assert after["logp_margin"] > before["logp_margin"] + 1.0
    assert after["pref_accuracy"] >= before["pref_accuracy"] and after["pref_accuracy"] > 0.5
