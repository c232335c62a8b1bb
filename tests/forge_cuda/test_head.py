"""The chunked loss head on torch (forge_cuda/head.py): the same values and gradients as the full logits, a few
positions at a time; SFT and DPO training give the same losses with and without it; the models it does not
split take the whole-logits path."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from rich.console import Console

from forge_core.rundir import RunDir
from forge_cuda import head
from tests.forge_cuda.run import train

pytestmark = pytest.mark.cuda


@pytest.fixture
def small_chunks(monkeypatch):
    """8 positions per chunk, so a few dozen positions run as several chunks (the real size is ~4 MiB of logits)."""
    monkeypatch.setattr(head, "head_chunk_rows", lambda *shape: 8)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
def test_chunked_nll_equals_the_full_logits_in_value_and_gradient(small_chunks, scale):
    gen = torch.Generator().manual_seed(3)
    n, d, v = 37, 24, 300  # four chunks of 8 and one of 5
    h0, w0 = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) * 0.3
    t, g = torch.randint(0, v, (n,), generator=gen), torch.randn(n, generator=gen)
    out = []
    for f in (lambda h, w: torch.nn.functional.cross_entropy((h @ w.T) * scale, t, reduction="none"),
              lambda h, w: head.chunked_nll(h, w, t, torch.tensor(scale))):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        nll = f(h, w)
        (nll * g).sum().backward()
        out.append((nll.detach(), h.grad, w.grad))
    (a, dh_a, dw_a), (b, dh_b, dw_b) = out
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(dh_b, dh_a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dw_b, dw_a, atol=1e-5, rtol=1e-5)


def _losses(run):
    return [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_training_with_the_chunked_head_gives_the_full_heads_losses(small_chunks, kind, make_cfg, sft_file, dpo_file,
                                                                    monkeypatch):
    calls = []
    real = head.chunked_nll
    monkeypatch.setattr(head, "chunked_nll", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    data = sft_file if kind == "sft" else dpo_file
    sets = {"quant__bits": 4, "train__steps": 3, "lora__dropout": 0.0}
    chunked = train(make_cfg(data, out="chunked", **sets), kind=kind, console=Console(file=io.StringIO()))
    assert calls and max(calls) > 8  # more positions than one chunk holds
    calls.clear()
    full = train(make_cfg(data, out="full", train__chunked_loss=False, **sets), kind=kind,
                 console=Console(file=io.StringIO()))
    assert not calls
    np.testing.assert_allclose(_losses(chunked), _losses(full), atol=1e-5)


def test_the_model_carries_the_setting_and_other_heads_take_the_whole_logits(make_cfg):
    from forge_cuda.model import build_model

    model = build_model(make_cfg(train__chunked_loss=False))[0]
    assert model.forge_chunked_loss is False and head.head_weight(model) is None
    model.forge_chunked_loss = True
    assert head.head_weight(model) is model.lm_head.weight  # the tiny Llama: a plain bias-free Linear
    model.config.model_type = "gemma2"  # soft-capped logits: not lm_head(h) alone
    assert head.head_weight(model) is None


def test_lm_eval_scores_at_the_masked_positions_equal_the_whole_logits(small_chunks, tiny_model):
    from transformers import AutoModelForCausalLM

    from forge_cuda.losses import continuation_scores

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    inputs, targets = torch.randint(0, 256, (3, 30), generator=gen), torch.randint(0, 256, (3, 30), generator=gen)
    mask = torch.zeros(3, 30)
    mask[0, 20:], mask[1, 5:25], mask[2, 29] = 1, 1, 1
    greedy_row = model(input_ids=inputs[2:]).logits[0, 29].argmax()  # row 2: its one scored target is the argmax
    targets[2, 29] = greedy_row
    batch = {"inputs": inputs, "targets": targets, "mask": mask}
    chunked = continuation_scores(model, batch)
    model.forge_chunked_loss = False
    whole = continuation_scores(model, batch)
    torch.testing.assert_close(chunked[0], whole[0], atol=1e-4, rtol=1e-6)
    assert chunked[1].tolist() == whole[1].tolist() == [False, False, True]
