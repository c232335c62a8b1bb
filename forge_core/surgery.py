"""Model surgery decisions shared by both backends: which linears get adapters, and what PiSSA puts in them.

The backends' adapt_model walks these paths and swaps in their own LoRA layer; the numbers (targets,
factors, residual) are decided here once, in numpy, so both backends build the same model.
"""

from __future__ import annotations

import numpy as np

from forge_core.config import DEFAULT_TARGETS, ForgeConfig, layer_indices, lora_init_kind, lora_scale
from forge_core.errors import ForgeError
from forge_core.pissa import pissa_factors, residual


def select_targets(linear_paths: list[str], cfg: ForgeConfig, num_blocks: int) -> list[str]:
    """The linears to adapt: `...layers.N....<target>` in the chosen blocks, in natural order."""
    chosen = set(layer_indices(cfg.lora.layers, num_blocks))
    targets = cfg.lora.targets or DEFAULT_TARGETS
    all_linear = "all-linear" in targets
    paths = []
    for path in linear_paths:
        parts = path.split(".")
        if "layers" not in parts[:-1]:
            continue
        block = int(parts[parts.index("layers") + 1])
        if block in chosen and (all_linear or parts[-1] in targets):
            paths.append(path)
    if not paths:
        names = sorted({p.split(".")[-1] for p in linear_paths})
        raise ForgeError(f"lora.targets {targets} matched no linear layer in the chosen blocks "
                         f"(names look like {', '.join(names[:10])})")
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


def uses_pissa(cfg: ForgeConfig) -> bool:
    return lora_init_kind(cfg.lora.init)[0] == "pissa"


def build_label(cfg: ForgeConfig, pissa_init: dict | None) -> str:
    """What the build does per layer, for its progress line."""
    quant = f", quantize to {cfg.quant.bits}-bit" if cfg.quant.bits else ""
    if not uses_pissa(cfg):
        return f"LoRA init{quant}"
    if pissa_init:
        return f"PiSSA residual from stored factors{quant}"
    _, niter = lora_init_kind(cfg.lora.init)
    return f"PiSSA {'randomized SVD (niter ' + str(niter) + ')' if niter else 'full SVD'}{quant}"


def check_full_precision(path: str, quantized: bool, cfg: ForgeConfig) -> None:
    """PiSSA factorizes W itself: a target that is already quantized cannot be split."""
    if quantized and uses_pissa(cfg):
        raise ForgeError(f"{path} is already quantized: PiSSA needs full-precision weights "
                         "(load an unquantized model; forge quantizes the residual itself)")


def pissa_split(w: np.ndarray, path: str, index: int, cfg: ForgeConfig, pissa_init: dict | None):
    """(A0 (r, in), B0 (out, r), W_res) for target number `index` at `path`, W (out, in) fp32.

    Stored factors (`pissa_init`, from a resume or a saved adapter) are reused, so the SVD never runs twice
    for a run and a reload rebuilds exactly the residual that was trained on; else the top-r SVD of W.
    """
    scale = lora_scale(cfg.lora)
    if pissa_init is not None and path in pissa_init:
        a0, b0 = pissa_init[path]
        return a0, b0, residual(w, a0, b0, scale)
    _, niter = lora_init_kind(cfg.lora.init)
    return pissa_factors(w, cfg.lora.rank, scale, niter=niter, seed=cfg.train.seed + index)
