"""Mixtures of experts end to end on tiny random fixtures with the Hub's config keys (tests/moe.py), on both backends:
LoRA / PiSSA on every expert of every block, the experts quantized, and the real clients agreeing with forge on the
trained model - mlx_lm.load(base, adapter), PEFT on the base (target_parameters), the merged export in transformers
and in mlx-lm - and MLX and torch on the losses. Targets that match nothing, DoRA on experts and the router are
covered on the side.

Tolerance 1e-4 on fp32 logits as in test_real_clients.py: the trained adapter moves the logits by > 0.1, so a wrong
expert order, transpose or scale fails by orders of magnitude.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from click.testing import CliRunner
from safetensors.numpy import load_file

from forge_core.adapters.convert import convert
from forge_core.adapters.export import export
from forge_core.adapters.formats import read_adapter
from forge_core.cli import cli
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from tests.moe import LAYOUT, TINY, make_tiny_moe

IDS = [5, 17, 99, 200, 3, 44, 250, 7, 120, 64]
TOL = 1e-4
KINDS = ["mixtral", "qwen3_moe"]


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: make_tiny_moe(root / kind, kind, seed=1) for kind in [*KINDS, "olmoe"]}


def rows_file(path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}: hello?"},
                          {"role": "assistant", "content": f"answer {i}, the world says hi"}]} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def moe_cfg(model, data, out, **over) -> ForgeConfig:
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(model), str(data), str(out)
    cfg.lora.rank, cfg.lora.init, cfg.quant.bits, cfg.quant.group_size = 4, "pissa", 4, 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.max_seq_len = 3, 2, 1e-2, 128
    cfg.train.log_every = 1
    for key, value in over.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def hf_logits(path) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def stacks(kind: str) -> list[str]:
    moe = LAYOUT[kind][0]
    return [f"model.layers.{n}.{moe}.switch_mlp.{p}" for n in range(TINY["num_hidden_layers"])
            for p in ("gate_proj", "up_proj", "down_proj")]


def trained(backend: str):
    """(train, load_adapted) of `backend`'s bound loop."""
    if backend == "mlx":
        from tests.forge_mlx.run import load_adapted, train
    else:
        pytest.importorskip("bitsandbytes")
        from tests.forge_cuda.run import load_adapted, train
    return train, load_adapted


def forge_logits(model) -> np.ndarray:
    if hasattr(model, "config"):  # torch
        import torch

        with torch.no_grad():
            return model(torch.tensor([IDS])).logits[0].float().numpy()
    return mlx_logits(model)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_expert_trains_4bit_pissa_and_the_clients_agree(kind, backend, moe_models, tmp_path):
    """3 steps, 4-bit (MLX affine / bitsandbytes NF4), PiSSA; the adapter holds one LoRA per expert of every block;
    forge's model (W_res + s·BA at full precision) = mlx_lm.load(base, adapter) = PEFT on the base = the merged
    export in transformers and in mlx-lm, to 1e-4."""
    import torch
    from mlx_lm import load
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train, load_adapted = trained(backend)
    base = moe_models[kind]
    run = train(moe_cfg(base, rows_file(tmp_path / "d.jsonl"), tmp_path / "run"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if m.get("split") == "train"]
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[-1] < losses[0]

    trained_adapter = read_adapter(run / "adapter")  # either layout, canonical (E, r, in) / (E, out, r)
    for stack in stacks(kind):  # every expert of every block trained its own LoRA (B moved off B0)
        b, b0 = trained_adapter.tensors[stack][1], trained_adapter.pissa_init[stack][1]
        assert (np.abs(b - b0).max(axis=(1, 2)) > 0).all()
    convert(run / "adapter", tmp_path / "mlx", to="mlx")  # PiSSA -> plain LoRA rank 2r on the original base
    adapter = load_file(str(tmp_path / "mlx" / "adapters.safetensors"))
    e, r, h, w = TINY["experts"], 8, TINY["hidden_size"], TINY["expert_width"]
    for stack in stacks(kind):  # one LoRA per expert, every block, in mlx-lm's LoRASwitchLinear layout
        out, inp = (h, w) if stack.endswith("down_proj") else (w, h)
        assert adapter[f"{stack}.lora_a"].shape == (e, r, inp) and adapter[f"{stack}.lora_b"].shape == (e, out, r)
    assert not any(".gate." in k for k in adapter)  # the router is not adapted by default

    model, _, _ = load_adapted(str(run / "adapter"), quantized=False)  # W_res + s·BA, full precision
    want = forge_logits(model)
    base_model, _ = load(str(base))
    assert np.abs(want - mlx_logits(base_model)).max() > 0.1
    with_adapter, _ = load(str(base), adapter_path=str(tmp_path / "mlx"))
    assert np.abs(mlx_logits(with_adapter) - want).max() < TOL
    convert(run / "adapter", tmp_path / "peft", to="peft")  # target_parameters on the fused experts
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["target_parameters"] == sorted(f"model.layers.{n}.mlp.experts.{p}" for n in range(2)
                                                   for p in ("gate_up_proj", "down_proj"))
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() < TOL
    export(run, fmt="merged", out=tmp_path / "merged")  # experts merged back in the checkpoint's own layout
    names = load_file(str(next((tmp_path / "merged").glob("*.safetensors")))).keys()
    assert any(".experts.3." in n for n in names) and not any("switch_mlp" in n for n in names)
    assert np.abs(hf_logits(tmp_path / "merged") - want).max() < TOL
    merged, _ = load(str(tmp_path / "merged"))
    assert np.abs(mlx_logits(merged) - want).max() < TOL


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_and_torch_agree_on_the_first_losses(kind, moe_models, tmp_path):
    """Full precision, PiSSA (the same factors from the same SVD), the same rows: the same 3 losses to 1e-4."""
    data = rows_file(tmp_path / "d.jsonl")
    losses = {}
    for backend in ("mlx", "torch"):
        train, _ = trained(backend)
        run = train(moe_cfg(moe_models[kind], data, tmp_path / backend, quant__bits=0))
        losses[backend] = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                           if json.loads(line).get("split") == "train"]
    assert len(losses["mlx"]) == 3 and losses["mlx"][-1] < losses["mlx"][0]
    np.testing.assert_allclose(losses["torch"], losses["mlx"], atol=1e-4, rtol=0)


def test_olmoe_plain_lora_starts_at_the_base_and_attention_only_quantizes_the_experts(moe_models):
    """LoRA init leaves the model as it was (B = 0 per expert); targets without the experts leave them to
    quantize_rest, which quantizes the stacks too."""
    from mlx_lm import load

    from forge_mlx import ops
    from forge_mlx.experts import QuantSwitchLinear

    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.lora.init, cfg.quant.bits = str(moe_models["olmoe"]), 4, "lora", 0
    model, *_ = ops.build_model(cfg)
    base, _ = load(str(moe_models["olmoe"]))
    assert np.abs(mlx_logits(model) - mlx_logits(base)).max() < 1e-5
    cfg.lora.targets, cfg.quant.bits, cfg.quant.group_size = ["q_proj", "v_proj"], 4, 32
    model, *_ = ops.build_model(cfg)
    switch = model.model.layers[0].mlp.switch_mlp
    assert all(isinstance(getattr(switch, p), QuantSwitchLinear) for p in ("gate_proj", "up_proj", "down_proj"))
    from mlx import nn

    assert type(model.model.layers[0].mlp.gate) is nn.Linear  # the router stays full precision
    # what mlx-lm's own quantization gives (QuantizedSwitchLinear, gather_qmm): every linear but the head and the
    # router, 4-bit g32
    nn.quantize(base, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and not isinstance(m, nn.Embedding)
                and not p.endswith(("lm_head", "mlp.gate")))
    assert np.abs(mlx_logits(model) - mlx_logits(base)).max() < TOL


def test_dequant_and_fused_expert_matmuls_agree_with_gradients(moe_models):
    """The CPU path (the stack dequantized in the forward and again in the backward) computes what gather_qmm does,
    input gradient included."""
    from mlx_lm.models.switch_layers import SwitchLinear

    from forge_mlx.experts import QuantSwitchLinear

    mx.random.seed(0)
    dense = SwitchLinear(64, 32, 4, bias=False)
    x = mx.random.normal((3, 5, 1, 1, 64))
    idx = mx.array(np.random.default_rng(0).integers(0, 4, (3, 5, 2)))
    outs = []
    for path in ("dequant", "fused"):
        layer = QuantSwitchLinear.from_switch(dense, 32, 4, matmul=path)
        y, g = mx.value_and_grad(lambda x_, layer=layer: (layer(x_, idx) ** 2).sum())(x)
        outs.append((np.array(y), np.array(g)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-4)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


def test_the_router_trains_only_when_named_and_stays_full_precision(moe_models, tmp_path):
    """MLX adapts the router when lora.targets names it (its base left dense), never through all-linear; torch,
    whose router is a parameter, refuses the name in one line, and a router LoRA does not go to PEFT's layout."""
    from mlx import nn

    from forge_cuda import ops as torch_ops
    from forge_mlx import ops

    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.lora.init, cfg.lora.targets = str(moe_models["mixtral"]), 4, "lora", ["gate"]
    cfg.quant.bits, cfg.quant.group_size = 4, 32
    model, *_ = ops.build_model(cfg)
    assert sorted(ops.trainable_params(model)) == [f"model.layers.{n}.block_sparse_moe.gate.{t}"
                                                   for n in range(2) for t in ("lora_a", "lora_b")]
    assert type(model.model.layers[0].block_sparse_moe.gate.linear) is nn.Linear
    with pytest.raises(ForgeError, match="'gate', the router of a mixture of experts, is adapted on the MLX"):
        torch_ops.build_model(cfg)
    ops.save_adapter(tmp_path / "router", model, cfg, {}, moe_models["mixtral"])
    with pytest.raises(ForgeError, match="is the router of a mixture of experts"):
        convert(tmp_path / "router", tmp_path / "peft", to="peft")
    cfg.lora.targets = ["all-linear"]
    model, *_ = ops.build_model(cfg)
    assert not any(".gate." in k for k in ops.trainable_params(model))


def test_a_peft_made_expert_adapter_converts_to_mlx_lm_with_peft_s_logits(moe_models, tmp_path):
    """A LoRA PEFT itself puts on the fused experts (target_parameters given as suffixes, as PEFT's docs do; gate
    and up sharing one rank) -> forge convert --to mlx -> mlx_lm.load gives PEFT's logits; and back to PEFT."""
    import torch
    from mlx_lm import load
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = moe_models["qwen3_moe"]
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM",
                                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        want = peft(torch.tensor([IDS])).logits[0].numpy()
    peft.save_pretrained(str(tmp_path / "peft"))
    convert(tmp_path / "peft", tmp_path / "mlx", to="mlx", base=str(base))
    model, _ = load(str(base), adapter_path=str(tmp_path / "mlx"))
    assert np.abs(mlx_logits(model) - want).max() < TOL and np.abs(want - hf_logits(base)).max() > 0.1
    convert(tmp_path / "mlx", tmp_path / "back", to="peft", base=str(base))
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        got = PeftModel.from_pretrained(hf, str(tmp_path / "back")).eval()(torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(got - want).max() < TOL


def test_dora_on_experts_is_refused_in_one_line(moe_models):
    from forge_mlx import ops

    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.lora.dora = str(moe_models["mixtral"]), 4, True
    with pytest.raises(ForgeError, match="DoRA is not defined for expert layers"):
        ops.build_model(cfg)
    cfg.lora.targets = ["q_proj", "v_proj"]  # attention only: DoRA as usual
    ops.build_model(cfg)


def test_a_named_target_that_matches_nothing_is_one_line_and_a_default_one_is_listed(moe_models, tiny_model,
                                                                                     tmp_path, capsys):
    from forge_mlx import ops

    data = rows_file(tmp_path / "d.jsonl")
    res = CliRunner().invoke(cli, ["train", "--model", str(moe_models["mixtral"]), "--data", str(data),
                                   "--backend", "mlx", "--out", str(tmp_path / "run"), "--steps", "1",
                                   "--set", "lora.targets=[q_proj, w1]"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    last = res.output.strip().splitlines()[-1]
    assert "lora.targets: 'w1' is not a linear of a decoder block" in last and "gate_proj" in last  # the plan's
    assert not (tmp_path / "run" / "adapter").exists()
    cfg = ForgeConfig()  # the build checks it too (a model the planner could not read)
    cfg.model.path, cfg.lora.targets = str(moe_models["mixtral"]), ["q_proj", "w1"]
    with pytest.raises(ForgeError, match="'w1' matches no linear layer of this model's blocks"):
        ops.build_model(cfg)
    from tests.test_architectures import _model

    cfg = ForgeConfig()  # phi3 fuses q/k/v and gate/up: the defaults it lacks are named, the rest adapted
    cfg.model.path, cfg.lora.rank, cfg.quant.group_size = str(_model("phi3", tiny_model, tmp_path / "phi3")), 4, 32
    model, *_ = ops.build_model(cfg)
    err = capsys.readouterr().err
    assert "default targets not in this model, skipped: q_proj, k_proj, v_proj, gate_proj, up_proj" in err
    assert {k.split(".")[-2] for k in ops.trainable_params(model)} == {"o_proj", "down_proj"}


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_gemma2_and_gpt_oss_train_on_torch(kind, tiny_model, tmp_path, capsys):
    """Models transformers builds without SDPA attention (gemma2's soft-capping, gpt-oss's sinks) load with an
    attention they support and train; gpt-oss's experts (fused, transposed, with biases) are not split - the
    default targets say so in one line and its attention trains."""
    from tests.moe import make_tiny_gpt_oss
    from tests.test_architectures import _model

    train, _ = trained("torch")
    model = make_tiny_gpt_oss(tmp_path / kind, tiny_model) if kind == "gpt_oss" else \
        _model("gemma2", tiny_model, tmp_path / kind)
    cfg = moe_cfg(model, rows_file(tmp_path / "d.jsonl"), tmp_path / "run", train__steps=2)
    run = train(cfg)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    if kind == "gpt_oss":
        assert "default targets not in this model, skipped: gate_proj, up_proj, down_proj" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_inference_folds_every_expert_adapter_into_dense_experts(backend, moe_models):
    """On the CPU, generation first folds each adapted layer (each expert's W_res + s·B_e A_e) and dequantizes the
    rest, once: the folded model computes what the training model does."""
    from forge_core.backend import ops as backend_ops

    ops = backend_ops("cuda" if backend == "torch" else backend)
    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.lora.init = str(moe_models["qwen3_moe"]), 4, "lora"
    cfg.quant.bits, cfg.quant.group_size = 4, 32
    model, *_ = ops.build_model(cfg)
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(np.shape(v)).astype(np.float32) * 0.1
               for k, v in ops.trainable_params(model).items()}
    ops.load_trainable(model, {k: mx.array(v) for k, v in weights.items()} if backend == "mlx" else weights)
    before = forge_logits(model)
    ops.for_inference(model)
    assert np.abs(forge_logits(model) - before).max() < TOL
    names = {type(m).__name__ for _, m in (model.named_modules())}
    assert not names & {"LoRASwitchLinear", "LoRAExperts", "QuantSwitchLinear", "QuantLinear"}


def test_awq_export_of_a_model_mlx_lm_has_no_recipe_for_is_one_line(moe_models, tmp_path):
    """mlx-lm's AWQ knows dense families only (no Mixtral recipe): one line naming the ones it has, nothing in --out;
    GPTQ, which quantizes any linear and expert stack, is the way."""
    from forge_mlx import ops

    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.lora.init, cfg.quant.bits = str(moe_models["mixtral"]), 4, "lora", 0
    model, *_ = ops.build_model(cfg)
    ops.save_adapter(tmp_path / "adapter", model, cfg, {}, moe_models["mixtral"])
    data = rows_file(tmp_path / "d.jsonl")
    with pytest.raises(ForgeError, match="mlx-lm's AWQ has no recipe for mixtral models .*use --quantize gptq"):
        export(tmp_path / "adapter", fmt="merged", out=tmp_path / "awq", quantize="awq", calib=str(data))
    assert not (tmp_path / "awq").exists()
