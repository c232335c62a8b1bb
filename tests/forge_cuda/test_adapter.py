"""The adapter dir the torch backend writes: PEFT layout + forge.json (+ pissa_init), loadable by PEFT itself."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from safetensors.numpy import load_file

from forge_core.adapters.formats import forge_adapter_dir
from forge_core.errors import ForgeError
from forge_cuda.lora import trainable_params
from forge_cuda.model import build_model, load_adapter_dir, load_base, save_adapter
from tests.forge_cuda.run import load_adapted

pytestmark = pytest.mark.cuda

TOKENS = torch.tensor([[5, 70, 71, 72, 100, 3, 9, 200], [1, 2, 3, 4, 5, 6, 7, 8]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def _trained(cfg, seed=1):
    """A model whose LoRA factors are random (as if trained), so B·A != 0."""
    model, _, model_dir, factors = build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_params(model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model, model_dir, factors


def test_plain_lora_adapter_is_peft_layout_and_peft_loads_it(tiny_model, make_cfg, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(lora__init="lora", quant__bits=0, lora__layers="-1:", lora__alpha=8)
    model, model_dir, factors = _trained(cfg)
    out = save_adapter(tmp_path / "adapter", model, cfg, factors, model_dir)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "forge.json"]
    weights = load_file(str(out / "adapter_model.safetensors"))
    a = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = weights["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4) and len(weights) == 14
    conf = json.loads((out / "adapter_config.json").read_text())
    assert sorted(conf["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                              "v_proj"]
    assert (conf["peft_type"], conf["task_type"], conf["r"], conf["lora_alpha"], conf["layers_to_transform"],
            conf["bias"], conf["init_lora_weights"]) == ("LORA", "CAUSAL_LM", 4, 8.0, [1], "none", True)
    meta = json.loads((out / "forge.json").read_text())
    assert meta["backend"] == "cuda" and meta["init"] == "lora" and meta["scale"] == 2.0
    assert meta["quantization"]["bits"] == 0 and len(meta["base_model_hash"]) == 16

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out))
    assert torch.allclose(_logits(peft_model), _logits(model), atol=1e-5)
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    assert (_logits(plain) - _logits(model)).abs().max() > 1e-2  # the adapter really changes the output


def test_pissa_adapter_stores_factors_and_reloads_to_the_same_model(make_cfg, tmp_path):
    cfg = make_cfg(lora__init="pissa", quant__bits=4)
    model, model_dir, factors = _trained(cfg)
    out = save_adapter(tmp_path / "adapter", model, cfg, factors, model_dir, extra={"kind": "sft", "steps": 3})
    init = load_file(str(out / "pissa_init.safetensors"))
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight"
    assert np.array_equal(init[key], factors["model.layers.0.mlp.gate_proj"][0])
    meta = json.loads((out / "forge.json").read_text())
    assert meta["init"] == "pissa" and meta["kind"] == "sft" and meta["quantization"]["mode"] == "nf4"
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"

    saved_cfg, _, stored = load_adapter_dir(out)
    assert saved_cfg.lora.init == "pissa" and set(stored) == set(factors)
    reloaded, _, _ = load_adapted(str(out))  # Q(W_res) rebuilt from the stored A0, B0: the same model
    assert torch.allclose(_logits(reloaded), _logits(model), atol=1e-5)


def test_pissa_adapter_exports_to_the_model_it_describes(make_cfg, tmp_path):
    """forge export --format merged of a torch PiSSA adapter = W + s·(BA − B0A0) = our model with the
    full-precision residual: the adapter files mean what the layers computed."""
    from transformers import AutoModelForCausalLM

    from forge_core.adapters.export import export

    cfg = make_cfg(lora__init="pissa", quant__bits=4, lora__alpha=8)
    model, model_dir, factors = _trained(cfg)
    save_adapter(tmp_path / "adapter", model, cfg, factors, model_dir)
    export(tmp_path / "adapter", fmt="merged", out=tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    full, _, _ = load_adapted(str(tmp_path / "adapter"), quantized=False)
    assert torch.allclose(_logits(merged), _logits(full), atol=1e-4)


def test_foreign_dirs_are_refused_with_one_line(tmp_path, tiny_model):
    with pytest.raises(ForgeError, match="no forge.json"):
        forge_adapter_dir(tmp_path)
    quantized = tmp_path / "q"
    quantized.mkdir()
    for f in tiny_model.iterdir():
        (quantized / f.name).write_bytes(f.read_bytes())
    conf = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**conf, "quantization_config": {"quant_method": "bnb"}}))
    with pytest.raises(ForgeError, match="already quantized"):
        load_base(str(quantized))
