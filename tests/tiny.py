"""Tiny random Llama models in HF layout, built in code (no download).

`make_tiny_model(dir)` writes config.json + model.safetensors + a byte-level tokenizer with a ChatML
chat template - the same shape of directory a real HF checkpoint has, so every loader (mlx_lm.load,
transformers, forge) reads it unmodified. hidden 64, 2 layers, vocab ~260: a forward pass is ~1 ms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(out: Path):
    """Byte-level BPE with no merges: 256 byte tokens + 3 specials. Saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_vocab))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(out))
    return fast


def tiny_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 128, tie: bool = False) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": None,
        "eos_token_id": 258,
        "pad_token_id": 256,
        "torch_dtype": "float32",
    }


def make_tiny_model(out, seed: int = 0, tie: bool = False, **shape) -> Path:
    """Write a random tiny Llama HF dir to `out` and return its path."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    cfg = tiny_config(len(tokenizer), tie=tie, **shape)
    cfg["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cfg["pad_token_id"] = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))

    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(o, n):  # (out, in), scaled so activations stay O(1)
        return (rng.standard_normal((o, n)) / np.sqrt(n)).astype(np.float32)

    weights = {"model.embed_tokens.weight": (rng.standard_normal((v, h)) * 0.5).astype(np.float32),
               "model.norm.weight": np.ones(h, np.float32)}
    if not tie:
        weights["lm_head.weight"] = w(v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights.update({
            p + "self_attn.q_proj.weight": w(q_out, h),
            p + "self_attn.k_proj.weight": w(kv_out, h),
            p + "self_attn.v_proj.weight": w(kv_out, h),
            p + "self_attn.o_proj.weight": w(h, q_out),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
        })
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def make_stand_in(real: Path, out: Path, seed: int = 0) -> Path:
    """A tiny random model in the place of a real one: the real dir's tokenizer, chat template and config keys,
    with hidden 64, 2 layers (the vocabulary stays, so the real data tokenizes as it does for the real model).

    It answers briefly: one coordinate of the residual stream is held at +5 (every embedding has it, no block
    writes it) and the end-of-turn token's embedding is large there, so with the head tied to the embeddings
    the end-of-turn token wins every step by a wide margin - generation (eval, GRPO's sampling) ends at once
    instead of running to max_new_tokens through random text."""
    import shutil

    from safetensors.numpy import save_file

    real, out = Path(real), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in real.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, out / f.name)
    cfg = json.loads((real / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    rng = np.random.default_rng(seed)
    h, i, v = 64, 128, cfg["vocab_size"]

    def w(o, n):
        return (rng.standard_normal((o, n)) / np.sqrt(n)).astype(np.float32)

    embed = (rng.standard_normal((v, h)) * 0.5).astype(np.float32)
    embed[:, -1] = 5.0  # the held coordinate
    eos = cfg["eos_token_id"][0] if isinstance(cfg["eos_token_id"], list) else cfg["eos_token_id"]
    embed[eos, -1] = 20.0
    weights = {"model.embed_tokens.weight": embed, "model.norm.weight": np.ones(h, np.float32)}
    if not cfg.get("tie_word_embeddings"):
        weights["lm_head.weight"] = embed.copy()
    for n in range(2):
        p = f"model.layers.{n}."
        weights.update({p + "self_attn.q_proj.weight": w(64, h), p + "self_attn.k_proj.weight": w(32, h),
                        p + "self_attn.v_proj.weight": w(32, h), p + "self_attn.o_proj.weight": w(h, 64),
                        p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                        p + "mlp.down_proj.weight": w(h, i), p + "input_layernorm.weight": np.ones(h, np.float32),
                        p + "post_attention_layernorm.weight": np.ones(h, np.float32)})
        weights[p + "self_attn.o_proj.weight"][-1] = 0.0  # no block writes the held coordinate
        weights[p + "mlp.down_proj.weight"][-1] = 0.0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
