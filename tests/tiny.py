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
