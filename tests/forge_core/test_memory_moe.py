"""The planner on mixtures of experts, from the Hub's own config.json (tests/moe.py): every expert stored, each token
through top-k of them, the router planned, and a refusal that says the frozen experts alone do not fit."""

import json

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.errors import ForgeError
from forge_core.memory.estimate import ModelShape
from forge_core.memory.plan import check_before_launch, plan_memory
from forge_core.models.known import known_model_config
from tests.forge_core.test_memory import cfg_with
from tests.moe import HUB_CONFIGS

RECIPE = {"quant.bits": 4, "lora.rank": 16, "train.batch_size": 1, "train.max_seq_len": 2048,
          "train.grad_checkpoint": True, "memory.device_memory": "192GB"}


def by_hand(config: dict, rank: int = 16, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                   "gate_proj", "up_proj", "down_proj")) -> dict:
    """The arithmetic the plan must agree with: every linear of every block at 4 bits + an fp16 scale and bias per
    64 weights (bf16 on a GPU: 0.5625 B/weight), the router included; the experts all stored; the embeddings and
    head dense bf16; LoRA fp32 A (r, in) + B (out, r) per target, per expert for the expert projections."""
    h, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    experts = config.get("num_local_experts") or config.get("num_experts")
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    shapes = {"q_proj": (heads * d, h), "k_proj": (kv * d, h), "v_proj": (kv * d, h), "o_proj": (h, heads * d),
              "gate_proj": (width, h), "up_proj": (width, h), "down_proj": (h, width), "gate": (experts, h)}
    copies = {n: experts if n in ("gate_proj", "up_proj", "down_proj") else 1 for n in shapes}
    per_block = sum(copies[n] * o * i for n, (o, i) in shapes.items())
    lora = sum(copies[t] * rank * sum(shapes[t]) for t in targets)
    layers = config["num_hidden_layers"]
    return {"blocks": layers * per_block * 0.5625, "params": layers * per_block,
            "embeddings": 2 * config["vocab_size"] * h * 2, "lora": layers * lora * 4}


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_every_expert_is_stored_and_planned_within_ten_percent(kind):
    config = HUB_CONFIGS[kind]
    plan = plan_memory(cfg_with(**RECIPE), config, backend="mlx", on_gpu=True)
    hand = by_hand(config)
    assert plan.component("base weights (blocks)") == pytest.approx(hand["blocks"], rel=0.10)
    assert plan.component("embeddings / lm_head") == pytest.approx(hand["embeddings"], rel=0.01)
    assert plan.component("LoRA params") == pytest.approx(hand["lora"], rel=0.01)
    note = next(c.note for c in plan.components if c.name == "base weights (blocks)")
    experts = config.get("num_local_experts") or config.get("num_experts")
    assert f"MoE: {experts} experts x top-{config['num_experts_per_tok']}" in note
    assert f"{hand['params'] / 1e9:.2f}B params" in note
    # the frozen model and the adapters are most of it: the whole plan within 10% of them + LoRA's grads and
    # Adam states (3 x the params more) + activations, which go with top-k, not with E
    frozen = hand["blocks"] + hand["embeddings"] + 4 * hand["lora"]
    assert frozen < plan.phase_bytes("train") < 1.10 * frozen + plan.component("activations") \
        + plan.component("backward working set") + plan.component("framework overhead")


def test_activations_follow_top_k_not_the_number_of_experts():
    """Doubling the experts leaves a token's activations as they were (bar the router's 2E fp32 values); doubling
    top-k adds top-k x (3 x the expert width + 2h) values per token per block."""
    config = HUB_CONFIGS["qwen3_moe"]
    cfg = cfg_with(**{**RECIPE, "train.grad_checkpoint": False, "lora.targets": ["q_proj", "v_proj"]})

    def acts(**change):
        return plan_memory(cfg, {**config, **change}, backend="mlx", on_gpu=True).component("activations")

    base = acts()
    tokens, layers, h, width, k = 2048, 48, 2048, 768, 8
    assert acts(num_experts=256) - base == layers * tokens * 8 * 128
    assert acts(num_experts_per_tok=2 * k) - base == layers * tokens * 2 * k * (3 * width + 2 * h)


def test_qwen3_30b_a3b_is_refused_on_16gb_with_advice():
    cfg = cfg_with(**{**RECIPE, "memory.device_memory": "16GB"})
    with pytest.raises(ForgeError) as e:
        check_before_launch(cfg, "sft", "mlx", HUB_CONFIGS["qwen3_moe"], force=False)
    msg = str(e.value)
    assert "\n" not in msg and "over 80% of 16.00 GiB" in msg
    assert "the frozen weights alone are 16.8" in msg and "every expert is stored" in msg
    assert "needs a device of at least" in msg and "--force" in msg


def test_forge_memory_plans_the_hub_ids_and_a_config_json_alike(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS["qwen3_moe"]))
    assert ModelShape.from_config(known_model_config("Qwen/Qwen3-30B-A3B")) == \
        ModelShape.from_config(HUB_CONFIGS["qwen3_moe"])
    assert ModelShape.from_config(known_model_config("mistralai/Mixtral-8x7B-Instruct-v0.1")) == \
        ModelShape.from_config(HUB_CONFIGS["mixtral"])
    res = CliRunner().invoke(cli, ["memory", "--model", str(tmp_path), "--backend", "mlx", "--device-memory",
                                   "16GB", "--quant", "4", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["verdict"] == "over" and not plan["suggestions"]


def test_a_moe_config_without_top_k_is_a_clear_error():
    broken = {k: v for k, v in HUB_CONFIGS["mixtral"].items() if k != "num_experts_per_tok"}
    with pytest.raises(ForgeError, match="no num_experts_per_tok"):
        ModelShape.from_config(broken)
