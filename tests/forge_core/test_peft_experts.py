"""PEFT's layout for expert adapters (forge_core/adapters/peft_experts.py), framework-free: gate and up fused
block-diagonally and split back exactly, a side never adapted stays absent, suffix target_parameters resolved."""

import numpy as np
import pytest

from forge_core.adapters import peft_experts as pe
from forge_core.errors import ForgeError

E, H, W = 3, 8, 6


def pair(rng, r, out, inp):
    return rng.standard_normal((E, r, inp)).astype(np.float32), rng.standard_normal((E, out, r)).astype(np.float32)


def stack(proj):
    return f"model.layers.1.block_sparse_moe.switch_mlp.{proj}"


@pytest.mark.parametrize("projs", [("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"), ("gate_proj",)])
def test_fuse_then_unfuse_gives_the_adapters_back(projs):
    rng = np.random.default_rng(0)
    shapes = {"gate_proj": (W, H), "up_proj": (W, H), "down_proj": (H, W)}
    tensors = {stack(p): pair(rng, 2, *shapes[p]) for p in projs}
    tensors["model.layers.1.self_attn.q_proj"] = (np.ones((2, H), np.float32), np.ones((H, 2), np.float32))
    if "up_proj" in projs and "gate_proj" not in projs:
        tensors[stack("up_proj")] = (tensors[stack("up_proj")][0], np.zeros((E, W, 2), np.float32))  # B = 0: step 0
    linear, fused, ranks = pe.fuse(tensors, "mixtral")
    assert set(linear) == {"model.layers.1.self_attn.q_proj"}
    params = sorted(ranks)
    assert all(p.startswith("model.layers.1.mlp.experts.") for p in params)
    back = pe.unfuse({**linear, **fused}, params, lambda p: ranks[p], "mixtral", "test")
    assert set(back) == set(tensors)
    for m, (a, b) in tensors.items():
        np.testing.assert_array_equal(back[m][0], a)
        np.testing.assert_array_equal(back[m][1], b)


def test_the_fused_layout_is_peft_s_per_expert_rows_and_interleaved_columns():
    """lora_A row e·R + k = A_e[k]; lora_B column k·E + e = B_e[:, k] (peft's ParamWrapper.get_delta_factors)."""
    rng = np.random.default_rng(1)
    a, b = pair(rng, 2, H, W)
    _, fused, _ = pe.fuse({stack("down_proj"): (a, b)}, "mixtral")
    a2, b2 = fused["model.layers.1.mlp.experts"]
    for e in range(E):
        for k in range(2):
            np.testing.assert_array_equal(a2[e * 2 + k], a[e, k])
            np.testing.assert_array_equal(b2[:, k * E + e], b[e, :, k])


def test_suffix_target_parameters_resolve_to_the_modules_present():
    keys = {"model.layers.0.mlp.experts.base_layer": 0, "model.layers.0.mlp.experts": 0, "model.layers.0.q": 0}
    assert pe.full_paths(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], keys) == [
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]


def test_an_unknown_architecture_or_parameter_is_one_clear_line():
    with pytest.raises(ForgeError, match="not a mixture of experts forge knows"):
        pe.unfuse({}, ["model.layers.0.mlp.experts.gate_up_proj"], lambda p: 2, "llama", "x")
    with pytest.raises(ForgeError, match="gate_up_proj / down_proj only"):
        pe.unfuse({}, ["model.layers.0.mlp.experts.w_in"], lambda p: 2, "qwen3_moe", "x")
