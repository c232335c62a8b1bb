"""The torch training loop on the CPU: NF4 SFT learns, resume is exact, DPO starts at log 2, accumulation is exact."""

import io
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from rich.console import Console
from safetensors.numpy import load_file

from forge_core import objectives
from forge_core.errors import ForgeError
from forge_core.pissa import pissa_factors
from forge_core.rundir import RunDir
from forge_cuda import ops
from forge_cuda.lora import trainable_params
from forge_cuda.model import build_model, checkpoint_blocks, load_base
from tests.forge_cuda.run import train

pytestmark = pytest.mark.cuda


def quiet():
    return Console(file=io.StringIO())


def losses(run_dir, split="train"):
    return [r["loss"] for r in RunDir(run_dir).metrics() if r["split"] == split]


def test_sft_on_nf4_base_learns_and_keeps_the_initial_factors(tiny_model, make_cfg, sft_file):
    cfg = make_cfg(sft_file, quant__bits=4, lora__init="pissa", train__steps=8)
    run = train(cfg, kind="sft", console=quiet())
    train_losses = losses(run)
    assert len(train_losses) == 8 and train_losses[-1] < 0.7 * train_losses[0]
    adapter = run / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    assert json.loads((adapter / "forge.json").read_text())["steps"] == 8
    # pissa_init holds A0 from the SVD of W - not the trained A (the layer must not train the factors in place)
    base, _, _ = load_base(str(tiny_model))
    a0, _, _ = pissa_factors(base.get_submodule("model.layers.0.mlp.up_proj").weight.detach().numpy(), 4, 1.0)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    assert np.array_equal(load_file(str(adapter / "pissa_init.safetensors"))[key], a0)
    assert np.array_equal(load_file(str(run / "pissa_init.safetensors"))[key], a0)
    assert not np.allclose(load_file(str(adapter / "adapter_model.safetensors"))[key], a0, atol=1e-4)


@pytest.mark.parametrize("sets", [{"quant__bits": 8, "lora__init": "pissa"},
                                  {"quant__bits": 4, "quant__mode": "fp4", "lora__init": "lora"}])
def test_int8_and_fp4_bases_learn_too(make_cfg, sft_file, sets):
    run = train(make_cfg(sft_file, train__steps=8, train__lr=2e-2, **sets), console=quiet())
    train_losses = losses(run)
    assert train_losses[-1] < 0.8 * train_losses[0]
    mode = json.loads((run / "adapter" / "forge.json").read_text())["quantization"]["mode"]
    assert mode == ("int8" if sets["quant__bits"] == 8 else "fp4")


def test_resume_is_exact(make_cfg, sft_file, tmp_path):
    """5 steps, 'killed', resumed for 5 more == 10 straight steps: losses and weights within 1e-5.
    Dropout on and 8 rows in batches of 3 (epochs wrap mid-run): the RNG and the data order must resume too."""
    sets = {"quant__bits": 4, "lora__dropout": 0.1, "train__steps": 10, "train__batch_size": 3,
            "train__warmup": 2, "train__save_every": 100}
    straight = train(make_cfg(sft_file, out="straight", **sets), console=quiet())
    cut = train(make_cfg(sft_file, out="cut", **sets), console=quiet(), stop_at=5)
    assert RunDir(cut).latest()[0] == 5 and not (cut / "adapter").exists()
    resumed = train(make_cfg(sft_file, out="ignored"), resume=str(cut), console=quiet())
    assert resumed == cut
    np.testing.assert_allclose(losses(resumed), losses(straight), atol=1e-5)
    w1 = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    w2 = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert max(np.abs(w1[k] - w2[k]).max() for k in w1) <= 1e-5


def test_dpo_starts_at_log2_and_caches_the_reference(make_cfg, dpo_file):
    cfg = make_cfg(dpo_file, quant__bits=4, lora__init="pissa", lora__dropout=0.0, train__steps=4, train__lr=5e-3)
    run = train(cfg, kind="dpo", console=quiet())
    recs = [r for r in RunDir(run).metrics() if r["split"] == "train"]
    assert abs(recs[0]["loss"] - math.log(2)) < 1e-5  # policy == reference at step 1: sigmoid(0)
    assert recs[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["loss"] < recs[0]["loss"]
    ref = load_file(str(run / "reference_logps.safetensors"))
    assert ref["train"].shape == (8, 2) and np.all(ref["train"] < 0)


def test_dpo_continues_from_an_sft_adapter_which_is_also_the_reference(make_cfg, sft_file, dpo_file):
    sft = train(make_cfg(sft_file, out="sft", quant__bits=4, train__steps=3), console=quiet())
    cfg = make_cfg(dpo_file, out="dpo", quant__bits=4, train__steps=2, dpo__adapter=str(sft / "adapter"))
    run = train(cfg, kind="dpo", console=quiet())
    assert abs(losses(run)[0] - math.log(2)) < 1e-5
    sft_a = load_file(str(sft / "adapter" / "pissa_init.safetensors"))
    dpo_a = load_file(str(run / "adapter" / "pissa_init.safetensors"))
    assert all(np.array_equal(sft_a[k], dpo_a[k]) for k in sft_a)  # the same A0/B0, not a new SVD


def _one_sgd_step(make_cfg, sft_file, batch_size, grad_accum):
    """Parameter change of ONE optimizer step with SGD(lr=1), no clipping: exactly minus the gradient the
    stepper applies (gradients of the loss sums, divided by the count over all micro-batches)."""
    cfg = make_cfg(sft_file, quant__bits=4, data__shuffle=False, train__batch_size=batch_size,
                   train__grad_accum=grad_accum, train__max_grad_norm=0.0)
    model, tok, _, _ = build_model(cfg)
    obj = objectives.build("sft", cfg, ops, model, tok, None, quiet())
    stepper = ops.make_stepper(cfg, model, obj.loss_fn)
    params = trainable_params(model)
    stepper.optimizer = torch.optim.SGD(params.values(), lr=1.0)
    before = {k: p.detach().clone() for k, p in params.items()}
    stepper.begin()
    loss_sum = count = 0.0
    for _ in range(grad_accum):
        ls, c, _ = stepper.accumulate(obj.next_batch())
        loss_sum, count = loss_sum + ls, count + c
    stepper.update(count, 1.0)
    return (loss_sum / count).item(), {k: before[k] - p.detach() for k, p in params.items()}


def test_grad_accumulation_equals_one_big_batch(make_cfg, sft_file):
    loss_big, grad_big = _one_sgd_step(make_cfg, sft_file, batch_size=4, grad_accum=1)
    loss_acc, grad_acc = _one_sgd_step(make_cfg, sft_file, batch_size=2, grad_accum=2)
    assert loss_acc == pytest.approx(loss_big, abs=1e-5)
    assert max((grad_big[k] - grad_acc[k]).abs().max().item() for k in grad_big) < 1e-5
    assert max(g.abs().max().item() for g in grad_big.values()) > 1e-3


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(make_cfg, sft_file):
    def grads(checkpoint):
        cfg = make_cfg(sft_file, quant__bits=4)
        model, tok, _, _ = build_model(cfg)
        if checkpoint:
            checkpoint_blocks(model)
        model.train()
        obj = objectives.build("sft", cfg, ops, model, tok, None, quiet())
        ls, _, _ = obj.loss_fn(model, obj.next_batch())
        ls.backward()
        return ls.item(), {k: p.grad.clone() for k, p in trainable_params(model).items()}

    (l1, g1), (l2, g2) = grads(False), grads(True)
    assert l1 == pytest.approx(l2, abs=1e-5)
    assert max((g1[k] - g2[k]).abs().max().item() for k in g1) < 1e-5


def test_adamw8bit_trains_and_resumes_on_cpu(make_cfg, sft_file):
    # rank 64 on gate_proj: A (64, 64) and B (128, 64) reach bnb's 4096-element minimum for 8-bit state
    sets = {"quant__bits": 4, "train__optimizer": "adamw8bit", "lora__rank": 64, "lora__alpha": 64,
            "train__steps": 4, "lora__targets": ["gate_proj"]}
    cut = train(make_cfg(sft_file, out="cut", **sets), console=quiet(), stop_at=2)
    state = load_file(str(RunDir(cut).latest()[1] / "optimizer.safetensors"))
    assert any(v.dtype == np.uint8 for v in state.values())  # 8-bit moments, as stored
    straight = train(make_cfg(sft_file, out="straight", **sets), console=quiet())
    resumed = train(make_cfg(sft_file), resume=str(cut), console=quiet())
    np.testing.assert_allclose(losses(resumed), losses(straight), atol=1e-5)
    assert losses(straight)[-1] < losses(straight)[0]


def test_paged_optimizer_needs_a_gpu(make_cfg, sft_file):
    with pytest.raises(ForgeError, match="paged_adamw8bit"):
        train(make_cfg(sft_file, train__optimizer="paged_adamw8bit", quant__bits=0), console=quiet())


def test_a_finished_run_is_not_overwritten(make_cfg, sft_file):
    cfg = make_cfg(sft_file, quant__bits=0, train__steps=1)
    train(cfg, console=quiet())
    with pytest.raises(ForgeError, match="already holds a run"):
        train(cfg, console=quiet())
