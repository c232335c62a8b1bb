"""Config: defaults in dataclasses, YAML recipes, --set overrides, strict keys and types."""

import pytest

from forge_core.config import ForgeConfig, layer_indices, lora_init_kind, lora_scale
from forge_core.config_parse import build_config, from_dict, set_value
from forge_core.errors import ForgeError


def test_recipe_then_overrides_then_set(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: 1e-4\n  steps: 5\nlora:\n  rank: 8\n")
    cfg = build_config(str(recipe), ["train.steps=7", "lora.targets=q_proj,v_proj"], {"lora.rank": 32})
    assert cfg.train.lr == 1e-4  # YAML's "1e-4" (a string to PyYAML) is read as the float it is
    assert cfg.train.steps == 7 and cfg.lora.rank == 32 and cfg.lora.targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("item,message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("nosuch.key=1", "unknown config section 'nosuch'"),
    ("train.steps=ten", "config key 'train.steps': expected an integer"),
    ("train.grad_checkpoint=maybe", "expected true/false"),
    ("quant.bits=5", "is not one of"),
    ("lora.init=svd", "lora.init: 'svd'"),
    ("backend=tpu", "config key 'backend'"),
])
def test_bad_overrides_name_the_key(item, message):
    with pytest.raises(ForgeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_config(None, [item])


def test_unqualified_key_resolves_when_unique_and_refuses_when_ambiguous():
    cfg = ForgeConfig()
    set_value(cfg, "discopop_tau", 0.2)
    assert cfg.dpo.discopop_tau == 0.2
    with pytest.raises(ForgeError, match=r"write it as section.key \(it is in dpo, orpo, simpo, cpo, kto, grpo\)"):
        set_value(cfg, "beta", 0.2)
    with pytest.raises(ForgeError, match="write it as section.key"):
        set_value(cfg, "nonexistent", 1)


def test_saved_config_round_trips():
    cfg = build_config(None, ["train.lr=3e-4", "lora.rank=8", "data.columns={messages: conv}"])
    assert from_dict(cfg.to_dict()) == cfg


def test_scale_init_and_layers_helpers():
    cfg = ForgeConfig()
    cfg.lora.rank, cfg.lora.alpha = 16, 32.0
    assert lora_scale(cfg.lora) == 2.0
    cfg.lora.rslora = True
    assert lora_scale(cfg.lora) == 8.0
    assert lora_init_kind("pissa_niter_4") == ("pissa", 4)
    assert layer_indices("-2:", 6) == [4, 5] and layer_indices("3", 6) == [3, 4, 5] and layer_indices("all", 2) == [0, 1]
    with pytest.raises(ForgeError, match="lora.layers"):
        layer_indices("x", 4)


def test_allowed_values_come_from_the_field_types():
    from forge_core.config import ForgeConfig
    from forge_core.config_parse import choices, set_value

    assert choices("quant.bits") == (0, 2, 3, 4, 6, 8)
    assert choices("backend") == ("auto", "mlx", "cuda")
    assert choices("train.lr") == ()
    cfg = ForgeConfig()
    set_value(cfg, "quant.bits", "8")  # --set gives strings: coerced to the Literal's type
    assert cfg.quant.bits == 8
    with pytest.raises(ForgeError, match=r"config key 'quant.bits': 5 is not one of \[0, 2, 3, 4, 6, 8\]"):
        set_value(cfg, "quant.bits", 5)
    with pytest.raises(ForgeError, match=r"config key 'backend': 'rocm' is not one of \['auto', 'cuda', 'mlx'\]"):
        set_value(cfg, "backend", "rocm")


@pytest.mark.parametrize("spec", ["-2:", "0:12", ":4", "3:-1"])
def test_a_layer_slice_in_set_is_taken_as_written(spec):
    """--set lora.layers=-2: (YAML would read a mapping) or 0:12 (YAML 1.1 reads base 60: 12) stays the slice."""
    cfg = build_config(None, [f"lora.layers={spec}"])
    assert cfg.lora.layers == spec
    bounds = [int(p) if p else None for p in spec.split(":")]
    assert layer_indices(cfg.lora.layers, 16) == list(range(16))[slice(*bounds)]
