"""The torch LoRA layer and the PiSSA / QPiSSA surgery: formulas, inits, stored factors, target selection."""

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from forge_core.errors import ForgeError
from forge_core.pissa import pissa_factors
from forge_cuda.lora import Layers, LoRALinear, factors_to_flat, flat_to_factors, trainable_params
from forge_cuda.model import build_model, load_base
from forge_cuda.quant import QuantLinear

pytestmark = pytest.mark.cuda

TOKENS = torch.tensor([[5, 70, 71, 72, 100, 3, 9, 200], [1, 2, 3, 4, 5, 6, 7, 8]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def test_lora_linear_is_base_plus_scaled_low_rank_product():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    a, b = torch.randn(4, 16), torch.randn(8, 4)
    layer = LoRALinear(base, rank=4, scale=0.5, lora_A=a, lora_B=b)
    x = torch.randn(3, 16)
    assert torch.allclose(layer(x), base(x) + 0.5 * x @ a.T @ b.T, atol=1e-5)
    assert torch.allclose(layer.fuse()(x), layer(x), atol=1e-5)
    assert torch.allclose(layer.delta(), 0.5 * b @ a)


def test_lora_init_is_peft_kaiming_uniform_and_zero_b():
    layer = LoRALinear(torch.nn.Linear(256, 32), rank=64, scale=1.0, generator=torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(256)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(±b) has std b/√3
    assert torch.count_nonzero(layer.lora_B) == 0


def test_lora_init_leaves_the_model_unchanged(tiny_model, make_cfg):
    base, _, _ = load_base(str(tiny_model))
    model, _, _, factors = build_model(make_cfg(lora__init="lora", quant__bits=0))
    assert factors == {}
    assert torch.allclose(_logits(model), _logits(base), atol=1e-5)
    assert len(trainable_params(model)) == 2 * 7 * 2  # A, B x 7 targets x 2 blocks


def test_pissa_init_equals_the_original_model_and_the_numpy_factors(tiny_model, make_cfg):
    base, _, _ = load_base(str(tiny_model))
    cfg = make_cfg(lora__init="pissa", quant__bits=0, lora__alpha=8)  # scale 2: the factors carry 1/sqrt(s)
    model, _, _, factors = build_model(cfg)
    assert torch.allclose(_logits(model), _logits(base), atol=1e-4)
    path = "model.layers.1.mlp.down_proj"
    w = base.get_submodule(path).weight.detach().numpy()
    a0, b0, w_res = pissa_factors(w, 4, 2.0)
    assert np.array_equal(factors[path][0], a0) and np.array_equal(factors[path][1], b0)
    layer = model.get_submodule(path)
    assert np.array_equal(layer.lora_A.detach().numpy(), a0)
    assert np.array_equal(layer.base_layer.weight.detach().numpy(), w_res)


def test_stored_factors_are_used_as_given_not_recomputed(make_cfg):
    cfg = make_cfg(lora__init="pissa", quant__bits=0)
    _, _, _, factors = build_model(cfg)
    flipped = {p: (-a, -b) for p, (a, b) in factors.items()}  # same product, other SVD signs
    model, _, _, used = build_model(cfg, pissa_init=flipped)
    path = "model.layers.0.self_attn.q_proj"
    assert np.array_equal(used[path][0], flipped[path][0])
    assert np.array_equal(model.get_submodule(path).lora_A.detach().numpy(), flipped[path][0])


def test_qpissa_quantizes_the_residual_and_keeps_factors_full_precision(tiny_model, make_cfg):
    base, _, _ = load_base(str(tiny_model))
    model, _, _, _ = build_model(make_cfg(lora__init="pissa", quant__bits=4))
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer.base_layer, QuantLinear) and layer.lora_A.dtype == torch.float32
    assert isinstance(model.model.layers[0].mlp.up_proj.base_layer, QuantLinear)
    assert type(model.lm_head) is torch.nn.Linear
    w = base.get_submodule("model.layers.0.mlp.up_proj").weight.detach()
    err_qpissa = (layer.base_layer.dequantized() + layer.delta().detach() - w).norm()
    plain, _, _, _ = build_model(make_cfg(lora__init="lora", quant__bits=4))
    err_plain = (plain.get_submodule("model.layers.0.mlp.up_proj").base_layer.dequantized() - w).norm()
    assert err_qpissa < err_plain


def test_rslora_scale_and_randomized_svd(make_cfg):
    model, _, _, factors = build_model(make_cfg(lora__init="pissa_niter_4", lora__rslora=True, quant__bits=0,
                                                lora__alpha=8))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.scale == 8 / math.sqrt(4)
    _, _, _, exact = build_model(make_cfg(lora__init="pissa", lora__rslora=True, quant__bits=0, lora__alpha=8))
    p = "model.layers.0.self_attn.q_proj"
    low, ref = factors[p][1] @ factors[p][0], exact[p][1] @ exact[p][0]
    rel = np.linalg.norm(low - ref) / np.linalg.norm(ref)
    assert 0 < rel < 0.2  # the randomized path ran (not bit-equal) and found nearly the same subspace


def test_target_selection_by_layers_and_names(tiny_model, make_cfg):
    cfg = make_cfg(lora__init="lora", quant__bits=0, lora__layers="-1:", lora__targets=["q_proj", "down_proj"])
    base, _, _ = load_base(str(tiny_model))
    assert Layers.targets(base, cfg) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    model, _, _, _ = build_model(cfg)
    assert sorted({k.rsplit(".", 1)[0] for k in trainable_params(model)}) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ForgeError, match="'qkv' matches no linear layer of this model's blocks"):
        build_model(make_cfg(lora__targets=["qkv"]))


def test_factor_files_read_both_layouts():
    a0, b0 = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((3, 2), np.float32)
    peft = factors_to_flat({"model.layers.0.mlp.up_proj": (a0, b0)})
    assert set(peft) == {"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight",
                         "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"}
    mlx = {"model.layers.0.mlp.up_proj.lora_a": a0.T, "model.layers.0.mlp.up_proj.lora_b": b0.T}
    for flat in (peft, mlx):
        got = flat_to_factors(flat)["model.layers.0.mlp.up_proj"]
        assert np.array_equal(got[0], a0) and np.array_equal(got[1], b0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_the_built_model_lets_the_memory_mapped_checkpoint_go(tiny_model, make_cfg):
    """The fp32 checkpoint, loaded as fp32, is memory-mapped; the weights surgery left as they were (embeddings,
    norms) would keep the whole file resident through the run: the build copies them, so nothing maps it after."""
    import gc

    def mapped() -> bool:
        return str(tiny_model / "model.safetensors") in Path("/proc/self/maps").read_text()

    model, _, _, _ = build_model(make_cfg(quant__bits=4))
    gc.collect()
    assert not mapped()
    assert model.model.embed_tokens.weight.dtype == torch.float32
