"""forge.json of a trained adapter: what a reload, an export or a DPO run on top needs to rebuild the model
exactly - the base (id, local dir, content hash), the LoRA shape, the init, the quantization and the whole
training config. Both backends write it through training_meta(); conversions use formats.forge_meta()."""

from __future__ import annotations

from forge_core.config import ForgeConfig, layer_indices, lora_scale


def training_meta(cfg: ForgeConfig, backend: str, model_dir, factors: dict, num_blocks: int, quantization: dict,
                  extra: dict | None = None, targets: list[str] | None = None) -> dict:
    from forge_core.models.sources import model_hash

    meta = {
        "format": "forge-adapter", "version": 1, "backend": backend,
        "base_model": cfg.model.path, "base_model_dir": str(model_dir), "base_model_hash": model_hash(model_dir),
        "init": "pissa" if factors else "lora", "rank": cfg.lora.rank, "alpha": cfg.lora.alpha,
        "scale": lora_scale(cfg.lora), "rslora": cfg.lora.rslora,
        **({"targets": targets} if targets is not None else {}),
        "layers": layer_indices(cfg.lora.layers, num_blocks), "quantization": quantization, "config": cfg.to_dict(),
    }
    meta.update(extra or {})
    return meta
