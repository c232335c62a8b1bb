"""The memory planner: component formulas on a tiny config, budgets, verdicts, suggestions, CLI.

Tiny shape (tests/tiny.py): h=64, i=128, L=2, H=4, KV=2, d=16, V=259, untied.
Per block the linears are q (64,64), k (32,64), v (32,64), o (64,64), gate/up (128,64), down (64,128):
36864 weights per block, 73728 in all.
"""

import copy
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.config import ForgeConfig
from forge_core.config_parse import set_value
from forge_core.errors import ForgeError
from forge_core.memory import estimate as me
from forge_core.memory.estimate import ModelShape, estimate, peak_bytes, phase_total
from forge_core.memory.plan import (
    check_before_launch,
    parse_size,
    plan_memory,
    runtime_limit_bytes,
)
from forge_core.models.known import known_model_config, load_model_config
from tests.tiny import make_tiny_model, tiny_config

TINY = tiny_config(259)
TINY_WEIGHTS = 73728
NORMS = (2 * 2 + 1) * 64  # (2L + 1)·h RMSNorm weights
LLAMA3 = "meta-llama/Meta-Llama-3-8B-Instruct"
GiB = 2**30


def cfg_with(**keys) -> ForgeConfig:
    """ForgeConfig with dotted overrides, e.g. cfg_with(**{"quant.bits": 8})."""
    cfg = ForgeConfig()
    for k, v in keys.items():
        set_value(cfg, k, v)
    return cfg


def parts(cfg, config=TINY, kind="sft", backend="mlx", on_gpu=True) -> dict[str, int]:
    return {c.name: c.bytes for c in estimate(cfg, ModelShape.from_config(config), kind, backend, on_gpu)}


# ------------------------------------------------------------------------------------------- sizes

def test_parse_size_reads_binary_units():
    assert parse_size("24GB") == 24 * 2**30
    assert parse_size("16 GiB") == 16 * 2**30
    assert parse_size("512MB") == 512 * 2**20
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("4096") == 4096
    for bad in ("lots", "0GB", "-1GB", "12 parsecs", "GiB"):
        with pytest.raises(ForgeError, match="memory.device_memory"):
            parse_size(bad)


# ------------------------------------------------------------------------------------------- weights

@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("on_gpu,cb", [(True, 2), (False, 4)])
def test_block_weights_match_affine_formula(bits, on_gpu, cb):
    """MLX affine: bits/8 per weight + a scale and a bias (compute dtype) per group of 64; norms dense."""
    per_weight = cb if bits == 0 else bits / 8 + 2 * cb / 64
    got = parts(cfg_with(**{"quant.bits": bits}), on_gpu=on_gpu)["base weights (blocks)"]
    assert got == TINY_WEIGHTS * per_weight + NORMS * cb


def test_nf4_weights_with_and_without_double_quant():
    """bitsandbytes NF4: n/2 bytes + absmax per 64 weights (1 byte + fp32 per 256 blocks with double quant)."""
    # per block: q,o 4096 weights, k,v 2048, gate/up/down 8192
    dq = 2 * (2048 + 64 + 4) + 2 * (1024 + 32 + 4) + 3 * (4096 + 128 + 4)
    plain = 2 * (2048 + 64 * 4) + 2 * (1024 + 32 * 4) + 3 * (4096 + 128 * 4)
    assert parts(ForgeConfig(), backend="cuda")["base weights (blocks)"] == 2 * dq + NORMS * 2
    no_dq = cfg_with(**{"quant.double_quant": False})
    assert parts(no_dq, backend="cuda")["base weights (blocks)"] == 2 * plain + NORMS * 2
    int8 = cfg_with(**{"quant.bits": 8})
    assert parts(int8, backend="cuda")["base weights (blocks)"] == TINY_WEIGHTS + 2 * 4 * (64 + 32 + 32 + 64 + 128 + 128 + 64) + NORMS * 2


def test_embeddings_quantized_only_when_asked_and_tied_counted_once():
    v, h = 259, 64
    assert parts(ForgeConfig())["embeddings / lm_head"] == 2 * v * h * 2
    assert parts(ForgeConfig(), config=tiny_config(259, tie=True))["embeddings / lm_head"] == v * h * 2
    q = cfg_with(**{"quant.embeddings": True})
    assert parts(q)["embeddings / lm_head"] == 2 * v * h * (0.5 + 4 / 64)


# ------------------------------------------------------------------------------------------- LoRA

def test_lora_params_are_rank_times_in_plus_out_over_targets_and_layers():
    r = 8
    per_block = r * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 3)  # q, k+v, o, gate+up+down
    assert per_block == 8192
    p = parts(cfg_with(**{"lora.rank": r}))
    assert p["LoRA params"] == 2 * per_block * 4
    assert p["LoRA grads"] == 2 * per_block * 4  # grad_accum 1: one fp32 copy
    assert p["optimizer states"] == 2 * per_block * 8  # AdamW: two fp32 states
    last = parts(cfg_with(**{"lora.rank": r, "lora.layers": "-1:"}))
    assert last["LoRA params"] == per_block * 4
    qv = parts(cfg_with(**{"lora.rank": r, "lora.targets": ["q_proj", "v_proj"]}))
    assert qv["LoRA params"] == 2 * r * (128 + 96) * 4
    accum = parts(cfg_with(**{"lora.rank": r, "train.grad_accum": 4}))
    assert accum["LoRA grads"] == 2 * 2 * per_block * 4  # the running sum and the new micro-batch


def test_adamw8bit_is_two_bytes_except_for_small_tensors():
    big = parts(cfg_with(**{"train.optimizer": "adamw8bit"}), config=known_model_config(LLAMA3), backend="cuda")
    assert big["optimizer states"] == 2 * big["LoRA params"] // 4
    # tiny factors are all < 4096 elements: bitsandbytes keeps them in 32-bit states
    small = parts(cfg_with(**{"train.optimizer": "adamw8bit"}), backend="cuda")
    assert small["optimizer states"] == 8 * small["LoRA params"] // 4


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ForgeError, match="lora.targets: 'qkv'"):
        parts(cfg_with(**{"lora.targets": ["qkv"]}))


# ------------------------------------------------------------------------------------------- activations

def tiny_block_bytes(cb: int, r: int = 16) -> int:
    """mlx, all 7 targets: norms 2h + q,k,v,out (2q + 2kv) + gate, silu, up (3i), in the compute dtype;
    LoRA inputs xn (h), xn2 (h), down's input (i) once each; x·A (r) per target."""
    h, q, kv, i = 64, 64, 32, 128
    return cb * (2 * h + 2 * q + 2 * kv + 3 * i) + cb * (h + h + i) + 7 * r * cb


def test_activations_per_token_and_checkpointing_lowers_them():
    b, t, L, h = 2, 64, 2, 64
    n = b * t
    base = {"train.batch_size": b, "train.max_seq_len": t}
    a = parts(cfg_with(**base))
    assert me.block_token_bytes(me.make_run(cfg_with(**base), ModelShape.from_config(TINY), "sft", "mlx", True)) \
        == tiny_block_bytes(2)
    assert a["activations"] == L * n * tiny_block_bytes(2) + n * h * 2
    probs = 1.5 * b * 4 * t * t * 2  # (B, H, T, T) bf16, 1.5 copies kept per block
    assert a["attention probabilities"] == L * probs
    c = parts(cfg_with(**base, **{"train.grad_checkpoint": True}))
    kept = 2 * (2 * h + 2 * 128)  # measured MLX keeps ~2h + 2i values per token per checkpointed block
    assert c["activations"] == L * n * kept + n * tiny_block_bytes(2) + n * h * 2  # kept + one block + final
    assert c["attention probabilities"] == probs
    assert c["activations"] < a["activations"]
    torch = parts(cfg_with(**base, **{"train.grad_checkpoint": True}), backend="cuda")
    assert torch["activations"] < parts(cfg_with(**base), backend="cuda")["activations"]
    eager = parts(cfg_with(**base, **{"train.grad_checkpoint": True, "train.compile": False}))
    assert eager["activations"] == a["activations"]  # mx.checkpoint saved nothing uncompiled (measured)


def test_sdpa_backend_keeps_no_attention_matrix():
    p = parts(ForgeConfig(), backend="cuda")
    assert "attention probabilities" not in p
    assert parts(ForgeConfig(), backend="mlx")["attention probabilities"] > 0


def test_torch_on_the_cpu_plans_what_the_c_heap_keeps_of_a_step():
    from forge_core.memory.constants import BACKEND_CONSTANTS

    for kind in ("sft", "dpo"):
        cpu = parts(ForgeConfig(), kind=kind, backend="cuda", on_gpu=False)
        churn = sum(cpu.get(name, 0) for name in me.STEP_CHURN)
        assert churn > cpu["activations"] > 0
        assert cpu["allocator retention"] == int(BACKEND_CONSTANTS["cuda"]["cpu_heap_retention"] * churn)
        assert "allocator retention" not in parts(ForgeConfig(), kind=kind, backend="cuda", on_gpu=True)
        assert "allocator retention" not in parts(ForgeConfig(), kind=kind, backend="mlx", on_gpu=False)


def test_logits_terms_are_btv_in_compute_dtype_and_fp32():
    """train.chunked_loss off: the whole (positions x V) logits and their gradient."""
    b, t, v = 2, 16, 32000
    config = tiny_config(v)
    cfg = cfg_with(**{"train.batch_size": b, "train.max_seq_len": t, "train.chunked_loss": False})
    gpu, cpu = parts(cfg, config=config, on_gpu=True), parts(cfg, config=config, on_gpu=False)
    assert gpu["logits + loss"] == b * t * v * (2 + 4)  # bf16 logits + the fp32 copy the loss reads
    assert cpu["logits + loss"] == b * t * v * 4  # fp32 already: no second copy
    assert gpu["backward working set"] == b * t * v * (3 * 4 + 2)  # MLX cross_entropy's 3 fp32 copies + a cast
    # forge's CPU log-sum-exp kernel holds 11 fp32 copies in its backward (measured, constants.py)
    assert cpu["backward working set"] == b * t * v * 11 * 4
    plain = cfg_with(**{"train.batch_size": b, "train.max_seq_len": t, "model.fast_cpu_math": False,
                        "train.chunked_loss": False})
    assert parts(plain, config=config, on_gpu=False)["backward working set"] == b * t * v * 3 * 4


def test_the_chunked_head_costs_one_chunk_whatever_the_positions():
    """MLX's chunked loss (the default): no whole logits, the working set of head_chunk_rows(V) positions; torch's
    chunks grow with the positions (a chunk's logits about the size of the hidden states); without chunked_loss
    torch keeps the whole logits."""
    from forge_core.memory.constants import head_chunk_rows

    v = 49152
    config, rows = tiny_config(v), head_chunk_rows(v)
    assert rows == 64  # HEAD_CHUNK_MIN_ROWS (4 MiB of fp32 logits would be 16 rows: each re-reading the weight)
    sizes = []
    for b in (2, 8):
        p = parts(cfg_with(**{"train.batch_size": b, "train.max_seq_len": 64}), config=config, on_gpu=False)
        assert "logits + loss" not in p
        sizes.append(p["backward working set"])
        assert p["backward working set"] == 18 * rows * v * 4  # the head's working set outweighs a tiny block's
    assert sizes[0] == sizes[1]
    short = parts(cfg_with(**{"train.batch_size": 1, "train.max_seq_len": 8}), config=config, on_gpu=False)
    assert short["backward working set"] == 18 * 8 * v * 4  # fewer positions than a chunk: the positions
    # torch: 2 x 2048 positions, D 64: at least 4096 / ceil(49152 / 64) = 6 rows -> 64 (the least); D 4096 (a
    # Llama-3-8B shape) -> 4096 / 12 = 342 -> 344 rows; 4 copies of a chunk
    assert head_chunk_rows(v, 4096, 64) == 64 and head_chunk_rows(v, 4096, 4096) == 344
    assert head_chunk_rows(1000) == 1048  # a small vocabulary: 4 MiB of logits is more rows than the least
    torch = parts(cfg_with(**{"train.batch_size": 2, "train.max_seq_len": 2048}), config=config, backend="cuda")
    assert "logits + loss" not in torch and torch["backward working set"] >= 4 * 64 * v * 4
    whole = cfg_with(**{"train.batch_size": 2, "train.max_seq_len": 2048, "train.chunked_loss": False})
    assert "logits + loss" in parts(whole, config=config, backend="cuda")


def test_torch_plans_the_whole_logits_where_its_head_does_not_split():
    """forge_cuda runs the head at the loss positions only through its chunked head: llama-style model types with a
    plain head. Without it (train.chunked_loss=false, a soft-capped gemma2, a quantized untied lm_head) the
    model's own logits at every position are planned, whatever the data's loss positions."""
    from forge_core.memory.data_shape import DataShape
    from forge_core.memory.estimate import make_run

    data = DataShape(seq=512, head_per_row=40, rows=8, source="test")
    config = tiny_config(49152)

    def head_tokens(cfg, **change):
        return make_run(cfg, ModelShape.from_config({**config, **change}), "sft", "cuda", True, data).head_tokens

    b = cfg_with().train.batch_size
    assert head_tokens(cfg_with()) == b * 40  # llama: the loss positions, chunked
    assert head_tokens(cfg_with(**{"train.chunked_loss": False})) == b * 512
    assert head_tokens(cfg_with(), model_type="gemma2") == b * 512
    assert head_tokens(cfg_with(**{"quant.embeddings": True})) == b * 512  # untied: the head is quantized
    assert head_tokens(cfg_with(**{"quant.embeddings": True}), tie_word_embeddings=True) == b * 40
    assert make_run(cfg_with(), ModelShape.from_config(config), "sft", "mlx", True, data).head_tokens == b * 40


def test_dpo_runs_chosen_and_rejected_as_twice_the_rows():
    cfg = cfg_with(**{"train.batch_size": 2})
    dpo, sft = parts(cfg, kind="dpo"), parts(cfg, kind="sft")
    sft4 = parts(cfg_with(**{"train.batch_size": 4}), kind="sft")
    for name in ("activations", "attention probabilities", "backward working set"):
        assert dpo[name] == sft4[name] > sft[name]
    assert dpo["base weights (blocks)"] == sft["base weights (blocks)"]  # no second (reference) model
    assert dpo["LoRA params"] == sft["LoRA params"]


# ------------------------------------------------------------------------------------------- init + total

def test_pissa_svd_transient_is_the_largest_target_and_only_for_pissa():
    # full SVD of (128, 64): 4 bytes x (4·out·in + k·(out + in)), k = 64
    assert parts(cfg_with(**{"lora.init": "pissa"}))["PiSSA SVD (largest target)"] == \
        4 * (4 * 128 * 64 + 64 * (128 + 64))
    # the default randomized one (rank 16): k = 3·min(2r + 8, 64) = 120 columns
    assert parts(ForgeConfig())["PiSSA SVD (largest target)"] == 4 * (4 * 128 * 64 + 120 * (128 + 64))
    assert "PiSSA SVD (largest target)" not in parts(cfg_with(**{"lora.init": "lora"}))


def test_total_is_the_larger_of_training_and_model_build():
    comps = estimate(ForgeConfig(), ModelShape.from_config(TINY), "sft", "mlx", True)
    train, init = phase_total(comps, "train"), phase_total(comps, "init")
    assert peak_bytes(comps) == max(train, init) > 0
    always = sum(c.bytes for c in comps if c.phase == "both")
    assert train == always + sum(c.bytes for c in comps if c.phase == "train")


@pytest.mark.parametrize("backend", ["mlx", "cuda"])
def test_tiny_estimate_is_positive_and_ordered_by_bits(backend):
    """On a GPU (fused / bitsandbytes matmuls): 4-bit < 8-bit < full precision, training and total."""
    totals = [phase_total(estimate(cfg_with(**{"quant.bits": b}), ModelShape.from_config(TINY), "sft", backend,
                                   True), "train") for b in (4, 8, 0)]
    assert 0 < totals[0] < totals[1] < totals[2]


def test_cpu_dequant_path_holds_one_dense_weight_at_a_time():
    """forge_mlx's CPU matmul dequantizes per call and again in the backward: one dense W at a time."""
    largest = 128 * 64 * 4  # the tiny model's gate/up/down (128 x 64) in fp32
    assert parts(ForgeConfig(), on_gpu=False)["dequantized weights"] == largest
    assert parts(cfg_with(**{"train.grad_checkpoint": True}), on_gpu=False)["dequantized weights"] == largest
    assert "dequantized weights" not in parts(ForgeConfig(), on_gpu=True)  # Metal: quantized_matmul
    ckpt = [phase_total(estimate(cfg_with(**{"quant.bits": b, "train.grad_checkpoint": True}),
                                 ModelShape.from_config(TINY), "sft", "mlx", False), "train") for b in (4, 8, 0)]
    assert ckpt[0] < ckpt[1] < ckpt[2]


def test_missing_config_key_names_it():
    with pytest.raises(ForgeError, match="intermediate_size"):
        ModelShape.from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "vocab_size": 10})


# ------------------------------------------------------------------------------------------- plans

def test_verdict_follows_threshold_of_the_given_budget():
    comps_total = plan_memory(cfg_with(**{"memory.device_memory": "64GB"}), TINY, on_gpu=True).total_bytes
    for budget, expected in ((comps_total * 2, "fits"), (comps_total / 0.75, "tight"), (comps_total, "over")):
        plan = plan_memory(cfg_with(**{"memory.device_memory": str(int(budget))}), TINY, on_gpu=True)
        assert (plan.verdict, plan.budget_bytes) == (expected, int(budget))
        assert plan.budget_source == f"memory.device_memory = {int(budget)}"
        assert runtime_limit_bytes(plan) == int(budget)


RECIPE_16GB = {"memory.device_memory": "16GB", "quant.bits": 4, "train.batch_size": 1, "train.max_seq_len": 2048,
               "lora.rank": 16, "train.grad_checkpoint": True}


def test_llama3_8b_4bit_weights_and_the_16gb_verdict_per_backend():
    """Llama-3-8B at 4 bits is ~5.6 GiB of weights (3.7 blocks + 2.0 bf16 embeddings/lm_head). Batch 1 x 2048,
    rank 16, checkpointing, 16 GiB device (limit 12.8 GiB):
    - cuda (torch checkpointing keeps block inputs; the chunked loss head): training ~8.5 GiB fits, ~12.1 GiB with
      the whole 2048 x 128256 logits and their gradient (train.chunked_loss=false), tight;
    - mlx as measured (mx.checkpoint keeps ~2h + 2i values per token per block): training ~13.1 GiB does not
      fit; rank 4 or max_seq_len 1024 are the suggested changes, and each fits (the chunked loss head keeps
      the 2048 x 128256 logits out: ~1.5 GiB less than the whole logits and their gradient);
    - both build the model one linear at a time (lazy load / host-side surgery): the build is ~7 GiB.
    - if a backend DID load the dense model before quantizing (~20 GiB), the refusal says the build is the peak."""
    cfg = cfg_with(**RECIPE_16GB)
    model = known_model_config(LLAMA3)
    mlx = plan_memory(cfg, model, backend="mlx", on_gpu=True)
    weights = mlx.component("base weights (blocks)") + mlx.component("embeddings / lm_head")
    assert 5.3 * GiB < weights < 5.9 * GiB
    cuda = plan_memory(cfg, model, backend="cuda", on_gpu=True)
    assert 8.2 * GiB < cuda.phase_bytes("train") < 8.7 * GiB and cuda.verdict == "fits"
    whole_cuda = plan_memory(cfg_with(**RECIPE_16GB, **{"train.chunked_loss": False}), model, backend="cuda",
                             on_gpu=True)
    assert 11.8 * GiB < whole_cuda.phase_bytes("train") <= whole_cuda.limit_bytes
    assert 12.9 * GiB < mlx.phase_bytes("train") < 13.5 * GiB
    assert mlx.verdict == "over" and [s.change for s in mlx.suggestions] == [{"lora.rank": 4},
                                                                              {"train.max_seq_len": 1024}]
    whole = plan_memory(cfg_with(**RECIPE_16GB, **{"train.chunked_loss": False}), model, backend="mlx", on_gpu=True)
    assert whole.phase_bytes("train") - mlx.phase_bytes("train") > 1.4 * GiB
    for plan in (mlx, cuda):
        assert plan.phase_bytes("init") < 8 * GiB
    me.BACKEND_CONSTANTS["mlx"]["init_holds_dense_model"] = True
    try:
        dense = plan_memory(cfg, model, backend="mlx", on_gpu=True)
        assert dense.verdict == "over" and 19 * GiB < dense.phase_bytes("init") < 21 * GiB and not dense.suggestions
        with pytest.raises(ForgeError, match="the peak is the model build"):
            check_before_launch(cfg, "sft", "mlx", model, force=False)
    finally:
        me.BACKEND_CONSTANTS["mlx"]["init_holds_dense_model"] = False


def test_llama3_8b_fits_16gb_with_a_streamed_build(monkeypatch):
    """The design target: weights converted one at a time (init ~7 GiB). Then cuda fits as configured, mlx
    fits with the suggested max_seq_len=1024, and mlx with checkpointing that keeps only block inputs fits too."""
    cfg, model = cfg_with(**RECIPE_16GB), known_model_config(LLAMA3)
    cuda = plan_memory(cfg, model, backend="cuda", on_gpu=True)
    assert cuda.verdict in ("fits", "tight") and cuda.phase_bytes("init") < 8 * GiB
    mlx = plan_memory(cfg, model, backend="mlx", on_gpu=True)
    assert mlx.verdict == "over" and {"train.max_seq_len": 1024} in [s.change for s in mlx.suggestions]
    monkeypatch.setitem(me.BACKEND_CONSTANTS["mlx"], "ckpt_kept", (1, 0))
    assert plan_memory(cfg, model, backend="mlx", on_gpu=True).verdict in ("fits", "tight")


@pytest.mark.parametrize("streamed,device", [(True, "16GB"), (False, "48GB")])
def test_llama3_8b_batch8_seq4096_is_over_and_every_suggestion_fits(monkeypatch, streamed, device):
    if streamed:
        monkeypatch.setitem(me.BACKEND_CONSTANTS["mlx"], "init_holds_dense_model", False)
    cfg = cfg_with(**{"memory.device_memory": device, "train.batch_size": 8, "train.max_seq_len": 4096,
                      "train.grad_checkpoint": False})
    model = known_model_config(LLAMA3)
    plan = plan_memory(cfg, model, backend="mlx", on_gpu=True)
    assert plan.verdict == "over" and plan.suggestions
    for s in plan.suggestions:
        fixed = copy.deepcopy(cfg)
        for key, value in s.change.items():
            set_value(fixed, key, value)
        again = plan_memory(fixed, model, backend="mlx", on_gpu=True)
        assert again.total_bytes == s.total_bytes <= plan.limit_bytes and again.verdict != "over"
        if "train.batch_size" in s.change:  # same effective batch
            assert s.change["train.batch_size"] * s.change["train.grad_accum"] == 8 * cfg.train.grad_accum


def test_check_before_launch_refuses_in_one_line_and_force_passes(capsys):
    cfg = cfg_with(**{"memory.device_memory": "1MB"})
    with pytest.raises(ForgeError) as e:
        check_before_launch(cfg, "sft", "mlx", TINY, force=False)
    msg = str(e.value)
    assert "\n" not in msg and "over 80% of 1.00 MiB" in msg and "; " in msg and "--force" in msg
    plan = check_before_launch(cfg, "sft", "mlx", TINY, force=True)
    assert plan.verdict == "over"
    assert "memory: planned peak" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- model config

def test_model_config_from_local_dir_known_names_and_unknown_hub_id(tmp_path):
    d = make_tiny_model(tmp_path / "tiny")
    config, source = load_model_config(str(d))
    assert config["hidden_size"] == 64 and source.endswith("config.json")
    assert load_model_config("smollm2-135m")[0]["num_hidden_layers"] == 30
    assert load_model_config("Qwen/Qwen2.5-7B-Instruct")[0]["vocab_size"] == 152064
    with pytest.raises(ForgeError, match="pass a local model dir"):
        load_model_config("nobody-here/no-such-model-xyz")


@pytest.mark.slow
def test_known_smollm2_shapes_match_the_bundled_gguf():
    from forge_core.models.sources import bundled_path

    config, _ = load_model_config(str(bundled_path("smollm2-135m")))
    assert ModelShape.from_config(config) == ModelShape.from_config(known_model_config("smollm2-135m"))


# ------------------------------------------------------------------------------------------- CLI

def test_forge_memory_prints_a_table_for_a_local_model(tmp_path):
    d = make_tiny_model(tmp_path / "tiny")
    res = CliRunner().invoke(cli, ["memory", "--model", str(d), "--backend", "mlx", "--device-memory", "8GB"])
    assert res.exit_code == 0, res.output
    for text in ("base weights (blocks)", "activations", "budget 8.00 GiB", "verdict: fits"):
        assert text in res.output


def test_forge_memory_json_is_one_object_with_suggestions(tmp_path):
    args = ["memory", "--set", f"model.path={LLAMA3}", "--backend", "mlx", "--device-memory", "48GB",
            "--batch-size", "8", "--max-seq-len", "4096", "--no-grad-checkpoint", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["verdict"] == "over" and out["budget_bytes"] == 48 * GiB and out["threshold"] == 0.8
    assert out["total_bytes"] == max(out["train_bytes"], out["init_bytes"])
    assert sum(c["bytes"] for c in out["components"] if c["phase"] != "init") == out["train_bytes"]
    assert out["suggestions"] and all(s["total_bytes"] <= 0.8 * 48 * GiB for s in out["suggestions"])
    dpo = json.loads(CliRunner().invoke(cli, args + ["--dpo"]).output)
    assert dpo["kind"] == "dpo" and dpo["train_bytes"] > out["train_bytes"]


def test_planning_a_cuda_run_imports_no_framework():
    code = ("import sys; from click.testing import CliRunner; from forge_core.cli import cli; "
            f"r = CliRunner().invoke(cli, ['memory', '--model', '{LLAMA3}', '--backend', 'cuda', "
            "'--device-memory', '24GB', '--json']); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules and 'mlx' not in sys.modules, 'framework imported'; "
            "print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["backend"] == "cuda" and plan["compute_dtype"] == "bfloat16" and plan["on_gpu"] is True


def test_the_8b_recipe_plans_from_its_yaml():
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "configs" / "llama3_8b_qpissa.yaml"
    res = CliRunner().invoke(cli, ["memory", "--config", str(recipe), "--backend", "mlx", "--device-memory", "16GB"])
    assert res.exit_code == 0, res.output
    assert "verdict: over" in res.output and "budget 16.00 GiB" in res.output


@pytest.mark.skipif(sys.platform == "darwin", reason="Linux: MLX runs on the CPU")
def test_budget_without_override_is_available_ram_and_cuda_needs_torch_or_a_size(monkeypatch):
    plan = plan_memory(ForgeConfig(), TINY, backend="mlx")
    assert plan.budget_source == "available RAM" and plan.context["on_gpu"] is False
    assert plan.context["compute_dtype"] == "float32" and plan.budget_bytes > 0
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ForgeError, match="--device-memory"):
        plan_memory(ForgeConfig(), TINY, backend="cuda")


def test_causal_fraction_counts_the_computed_query_blocks():
    assert me.causal_fraction(64, 64) == 1.0 and me.causal_fraction(512, 0) == 1.0
    assert me.causal_fraction(128, 64) == pytest.approx(0.75)  # blocks of 64 and 128 keys out of 2 x 128
    assert me.causal_fraction(512, 64) == pytest.approx(36 / 64)
    assert me.causal_fraction(100, 64) == pytest.approx((64 * 64 + 100 * 36) / 100 ** 2)  # a short last block


def test_mlx_cpu_kernels_change_the_attention_terms_only_on_cpu():
    cfg = ForgeConfig()
    cfg.train.batch_size, cfg.train.max_seq_len = 2, 512
    shape = ModelShape.from_config(tiny_config(259, hidden=256, layers=4, heads=8, kv_heads=4, intermediate=1024))

    def probs(fast: bool, on_gpu: bool) -> int:
        c = copy.deepcopy(cfg)
        c.model.fast_cpu_math = fast
        return next(x.bytes for x in estimate(c, shape, "sft", "mlx", on_gpu) if x.name == "attention probabilities")

    square = 2 * 8 * 512 ** 2 * 4  # B·H·T² fp32
    assert probs(False, False) == int(1.5 * 4 * square)  # MLX's sdpa fallback: 1.5 copies per block
    assert probs(True, False) == int(1.0 * (36 / 64) * 4 * square)  # forge's kernels: the causal blocks, once
    assert probs(True, True) == int(1.5 * 4 * 2 * 8 * 512 ** 2 * 2)  # Metal: bf16, the kernels are not used


def test_data_parallel_plan_is_one_ranks_share_of_this_machine():
    model = known_model_config("smollm2-135m")
    cfg = cfg_with(**{"memory.device_memory": ""})
    one = plan_memory(cfg, model, backend="mlx", on_gpu=False)
    two = plan_memory(cfg, model, backend="mlx", on_gpu=False, nproc=2)
    buffer = [c for c in two.components if c.name == "gradient all-reduce buffer"]
    # rank 16 on q,k,v,o,gate,up,down of 30 blocks: 16 x (in + out) summed = 4,884,480 params; fp32, twice
    assert len(buffer) == 1 and buffer[0].bytes == 2 * 4 * 4_884_480
    assert two.total_bytes == one.total_bytes + buffer[0].bytes
    assert two.budget_bytes == one.budget_bytes // 2 and two.budget_source.endswith("/ 2 processes on this machine")
    own = plan_memory(cfg, model, backend="mlx", on_gpu=False, nproc=2, shared=False)  # one device per rank
    assert own.budget_bytes == one.budget_bytes


def test_cli_memory_nproc_plans_one_rank(tmp_path):
    res = CliRunner().invoke(cli, ["memory", "--model", "smollm2-135m", "--nproc", "2", "--json"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["nproc"] == 2 and "2 processes on this machine" in plan["budget_source"]
