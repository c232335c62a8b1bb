"""Tiny checkpoints whose rope settings matter, with a tokenizer copied from another tiny model: a Llama with base
1e5 (and linear scaling) written in either config style, and a Gemma 3 with its two bases (tests/test_gguf_export.py
checks the GGUF metadata, tests/test_llama_cpp_client.py llama.cpp's tokens)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    for f in Path(tokenizer_dir).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copyfile(f, out / f.name)


def rope_llama(tokenizer_dir: Path, out: Path, style: str, scaled: bool) -> Path:
    """Base 1e5 (not llama.cpp's default 1e4), linear scaling x2 if `scaled`; style "rope_parameters" (transformers 5)
    or "top-level" (rope_theta / rope_scaling, as transformers 4 wrote them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=base["vocab_size"], max_position_embeddings=256,
                         rope_theta=1e5, rope_scaling={"rope_type": "linear", "factor": 2.0} if scaled else None,
                         eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"], bos_token_id=None)
    torch.manual_seed(5)
    LlamaForCausalLM(config).float().save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 1e5
    if style == "top-level":
        params = cfg.pop("rope_parameters")
        cfg.update(rope_theta=params.pop("rope_theta"), rope_scaling=params if scaled else None)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def gemma3(tokenizer_dir: Path, out: Path) -> Path:
    """6 blocks: five sliding (window 8, base 1e4), one global (base 1e6), rope_parameters per layer type."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    base = json.loads((Path(tokenizer_dir) / "config.json").read_text())
    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                              vocab_size=base["vocab_size"], max_position_embeddings=128, sliding_window=8,
                              eos_token_id=base["eos_token_id"], pad_token_id=base["pad_token_id"], bos_token_id=None)
    torch.manual_seed(3)
    Gemma3ForCausalLM(config).float().save_pretrained(str(out), safe_serialization=True)
    copy_tokenizer(tokenizer_dir, out)
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["full_attention"]["rope_theta"] == 1e6
    return out
