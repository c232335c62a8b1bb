"""forge.json of a trained adapter: what a reload, an export or a DPO run on top needs to rebuild the model
exactly - the base (id, local dir, content hash), the LoRA shape, the init, the quantization and the whole
training config. Both backends write it through training_meta(); a converted adapter through forge_meta()."""

from __future__ import annotations

import json
from pathlib import Path

from forge_core.config import ForgeConfig, layer_indices, lora_scale
from forge_core.models.sources import model_hash


def training_meta(cfg: ForgeConfig, backend: str, model_dir, factors: dict, num_blocks: int, quantization: dict,
                  extra: dict | None = None, targets: list[str] | None = None) -> dict:
    meta = {
        "format": "forge-adapter", "version": 1, "backend": backend,
        "base_model": cfg.model.path, "base_model_dir": str(model_dir), "base_model_hash": model_hash(model_dir),
        "model_type": _model_type(model_dir),
        "init": "pissa" if factors else "lora", "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
        "scale": lora_scale(cfg.lora), "rslora": cfg.lora.rslora,
        **({"targets": targets} if targets is not None else {}),
        "layers": layer_indices(cfg.lora.layers, num_blocks), "quantization": quantization, "config": cfg.to_dict(),
    }
    meta.update(extra or {})
    return meta


def _model_type(model_dir) -> str | None:
    """config.json's model_type (names a mixture's experts in PEFT's layout: forge_core/adapters/peft_experts.py)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def forge_meta(adapter, layout: str) -> dict:
    """forge.json for `adapter` written in `layout`; a conversion records the source config it came from."""
    meta = {k: v for k, v in adapter.forge.items() if k != "converted_from"}
    meta.update({"format": "forge-adapter", "version": 1, "base_model": adapter.base_model,
                 "base_model_hash": adapter.forge.get("base_model_hash"), "init": adapter.init,
                 "rank": adapter.rank, "alpha": adapter.alpha, "scale": adapter.scale,
                 "rslora": adapter.rslora, "dora": adapter.magnitudes is not None,
                 "targets": adapter.targets, "layers": adapter.layers,
                 "quantization": adapter.forge.get("quantization"), "config": adapter.forge.get("config")})
    if layout != adapter.layout and adapter.source_config:
        meta["converted_from"] = {"layout": adapter.layout, "adapter_config": adapter.source_config}
    elif "converted_from" in adapter.forge:
        meta["converted_from"] = adapter.forge["converted_from"]
    return meta
