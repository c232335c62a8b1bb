"""Shapes of models the memory planner can size without their files: a small built-in table of common
hub ids, a local HF dir, a local GGUF's metadata, or a config.json already in the local HF cache."""

from __future__ import annotations

import json
from pathlib import Path

from forge_core.errors import ForgeError


def _llama(h, i, layers, heads, kv, vocab, tied, head_dim=None, model_type="llama") -> dict:
    return {"model_type": model_type, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim or h // heads,
            "vocab_size": vocab, "tie_word_embeddings": tied}


def _moe(h, expert_i, layers, heads, kv, vocab, experts, top_k, head_dim=None, model_type="mixtral",
         dense_i=None) -> dict:
    """A mixture of experts: every block's MLP is `experts` experts of width `expert_i`, `top_k` per token
    (`dense_i`: the config's intermediate_size where it differs, as Qwen3-MoE's does)."""
    return {**_llama(h, dense_i or expert_i, layers, heads, kv, vocab, False, head_dim, model_type),
            "moe_intermediate_size": expert_i, "num_experts": experts, "num_experts_per_tok": top_k}


_KNOWN = {
    "huggingfacetb/smollm2-135m": _llama(576, 1536, 30, 9, 3, 49152, True),
    "meta-llama/meta-llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256, False),
    "meta-llama/llama-3.1-8b": _llama(4096, 14336, 32, 32, 8, 128256, False),
    "qwen/qwen2.5-0.5b": _llama(896, 4864, 24, 14, 2, 151936, True, model_type="qwen2"),
    "qwen/qwen2.5-1.5b": _llama(1536, 8960, 28, 12, 2, 151936, True, model_type="qwen2"),
    "qwen/qwen2.5-7b": _llama(3584, 18944, 28, 28, 4, 152064, False, model_type="qwen2"),
    "mistralai/mistral-7b-v0.1": _llama(4096, 14336, 32, 32, 8, 32000, False, model_type="mistral"),
    "mistralai/mistral-7b-v0.3": _llama(4096, 14336, 32, 32, 8, 32768, False, model_type="mistral"),
    "mistralai/mixtral-8x7b-v0.1": _moe(4096, 14336, 32, 32, 8, 32000, 8, 2),
    "qwen/qwen3-30b-a3b": _moe(2048, 768, 48, 32, 4, 151936, 128, 8, head_dim=128, model_type="qwen3_moe",
                                dense_i=6144),
}
KNOWN_MODELS = {**_KNOWN, **{k + "-instruct": v for k, v in _KNOWN.items()},
                "smollm2-135m": _KNOWN["huggingfacetb/smollm2-135m"],  # the bundled model
                "mistralai/mistral-7b-instruct-v0.1": _KNOWN["mistralai/mistral-7b-v0.1"],
                "mistralai/mistral-7b-instruct-v0.2": _KNOWN["mistralai/mistral-7b-v0.1"],
                "mistralai/mistral-7b-instruct-v0.3": _KNOWN["mistralai/mistral-7b-v0.3"],
                "mistralai/mixtral-8x7b-instruct-v0.1": _KNOWN["mistralai/mixtral-8x7b-v0.1"],
                "qwen/qwen3-30b-a3b-instruct-2507": _KNOWN["qwen/qwen3-30b-a3b"]}


def known_model_config(name: str) -> dict | None:
    """Shapes of a few common models (config.json keys), by hub id or bundled name; None if unknown."""
    found = KNOWN_MODELS.get(str(name).strip().lower())
    return dict(found) if found else None


def load_model_config(spec: str) -> tuple[dict, str]:
    """(config.json dict, where it came from) for model.path, without downloading anything:
    a local HF dir, a local .gguf file (its metadata), a known model, or the local HF hub cache."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ForgeError(f"model.path {path}: no config.json; the memory planner needs a HF model dir")
        return json.loads((path / "config.json").read_text()), str(path / "config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from forge_core.models.gguf_import import llama_config, read_gguf

        meta, tensors = read_gguf(path)
        return llama_config(meta, {t.name for t in tensors}, "float32", []), str(path)
    known = known_model_config(spec)
    if known is not None:
        return known, f"built-in shapes of {spec}"
    cached = _hub_cache_config(spec)
    if cached is not None:
        return json.loads(Path(cached).read_text()), cached
    raise ForgeError(f"model.path '{spec}': not a local dir, not a known model and no config.json in the local "
                     "HF cache; pass a local model dir (with config.json) to plan its memory")


def _hub_cache_config(repo_id: str) -> str | None:
    if repo_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects is simply not cached  # noqa: BLE001
        return None
    return found if isinstance(found, str) else None
