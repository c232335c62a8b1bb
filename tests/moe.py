"""Mixtures of experts for tests: the Hub's own config.json of each (every key, as the checkpoint ships it) and tiny
random models built from them - the same keys with the sizes shrunk (hidden 64, 2 blocks, 4 experts, top-2, expert
width 32), weights in the checkpoint's own per-expert layout - so mlx-lm and transformers load a fixture as they
load the real model (mlx-lm stacks the experts into SwitchLinear; transformers 5 fuses them into 3-D parameters).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# config.json of mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B and allenai/OLMoE-1B-7B-0924 as on the Hub
HUB_CONFIGS = {
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
        "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
    },
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
        "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
        "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    },
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16,
        "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304,
    },
}

# where each checkpoint keeps its MoE: (MLP module, router, expert projections gate/up/down as the Hub names them)
LAYOUT = {
    "mixtral": ("block_sparse_moe", "gate", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "experts": 4, "top_k": 2, "expert_width": 32}


def tiny_moe_config(kind: str, vocab: int, eos: int, pad: int, **sizes) -> dict:
    """The Hub config of `kind`, every key kept, the sizes shrunk (TINY, or `sizes` in its keys)."""
    cfg = json.loads(json.dumps(HUB_CONFIGS[kind]))
    t = {**TINY, **sizes}
    cfg.update(hidden_size=t["hidden_size"], num_hidden_layers=t["num_hidden_layers"],
               num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
               num_experts_per_tok=t["top_k"], vocab_size=vocab, eos_token_id=eos, max_position_embeddings=512,
               torch_dtype="float32")
    cfg["num_local_experts" if "num_local_experts" in cfg else "num_experts"] = t["experts"]
    if "moe_intermediate_size" in cfg:  # Qwen3-MoE: the expert width; intermediate_size is a dense MLP's
        cfg.update(moe_intermediate_size=t["expert_width"], intermediate_size=2 * t["expert_width"])
    else:
        cfg["intermediate_size"] = t["expert_width"]
    if "head_dim" in cfg:
        cfg["head_dim"] = t["hidden_size"] // t["num_attention_heads"]
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = t["num_hidden_layers"]
    for key in ("bos_token_id", "pad_token_id"):
        if key in cfg:
            cfg[key] = pad
    return cfg


def make_tiny_moe(out, kind: str, seed: int = 0, **sizes) -> Path:
    """Write a random tiny `kind` ("mixtral", "qwen3_moe", "olmoe") HF dir with the tiny byte tokenizer (`sizes`:
    TINY's keys, for a bigger one)."""
    from safetensors.numpy import save_file

    from tests.tiny import make_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out)
    cfg = tiny_moe_config(kind, len(tok), tok.convert_tokens_to_ids("<|im_end|>"),
                          tok.convert_tokens_to_ids("<|endoftext|>"), **sizes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    h, v, t = cfg["hidden_size"], cfg["vocab_size"], {**TINY, **sizes}
    hd = h // cfg["num_attention_heads"]
    q, kv, i = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd, t["expert_width"]

    def w(o, n):
        return (rng.standard_normal((o, n)) / np.sqrt(n)).astype(np.float32)

    def norm(n):  # not all ones, so a norm loaded in the wrong place shows
        return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    weights = {"model.embed_tokens.weight": (rng.standard_normal((v, h)) * 0.5).astype(np.float32),
               "model.norm.weight": norm(h), "lm_head.weight": w(v, h)}
    moe, router, (gate, up, down) = LAYOUT[kind]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights.update({p + "self_attn.q_proj.weight": w(q, h), p + "self_attn.k_proj.weight": w(kv, h),
                        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, q),
                        p + "input_layernorm.weight": norm(h), p + "post_attention_layernorm.weight": norm(h),
                        p + f"{moe}.{router}.weight": w(t["experts"], h)})
        if kind == "qwen3_moe":  # per-head q/k norms
            weights.update({p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd)})
        if kind == "olmoe":  # q/k norms over the whole projection
            weights.update({p + "self_attn.q_norm.weight": norm(q), p + "self_attn.k_norm.weight": norm(kv)})
        for e in range(t["experts"]):
            x = f"{p}{moe}.experts.{e}."
            weights.update({x + f"{gate}.weight": w(i, h), x + f"{up}.weight": w(i, h), x + f"{down}.weight": w(h, i)})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_tiny_gpt_oss(out, tiny_model: Path, seed: int = 0) -> Path:
    """A tiny random gpt-oss written by transformers 5 (its own layout: experts fused and transposed, with biases;
    attention sinks, sliding and full layers), with the tiny byte tokenizer. Full precision: the Hub's checkpoint
    is MXFP4, which forge refuses as an already quantized base."""
    import shutil

    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    base = json.loads((Path(tiny_model) / "config.json").read_text())
    config = GptOssConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                          vocab_size=base["vocab_size"], max_position_embeddings=128, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"], eos_token_id=base["eos_token_id"],
                          pad_token_id=base["pad_token_id"], bos_token_id=None)
    torch.manual_seed(seed)
    out = Path(out)
    GptOssForCausalLM(config).float().save_pretrained(str(out), safe_serialization=True)
    for f in Path(tiny_model).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out
