"""Loading a base model with transformers, adapting it, and the adapter dir on disk (PEFT layout).

Any architecture transformers' AutoModelForCausalLM loads works (Llama, Qwen2/3, Mistral, Gemma, Phi...):
forge_core.models.sources turns every model spec (HF dir, hub id, GGUF, bundled name) into a local HF dir, loaded
with trust_remote_code=False and safetensors only. Compute dtype: fp32 on the CPU, bf16 on CUDA (fp16
where the GPU has no bf16), unless model.dtype says otherwise. Attention: "sdpa" where the model has it.
The full-precision weights are loaded on the CPU; adapt_model moves them to the GPU layer by layer,
quantized, so the GPU never holds the dense model.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from torch import nn

from forge_core.adapters.forge_json import training_meta
from forge_core.adapters.formats import read_trained, save_trained
from forge_core.config import ForgeConfig
from forge_core.data import load_tokenizer
from forge_core.errors import ForgeError
from forge_core.models.experts import canonical_path, torch_path
from forge_core.models.sources import resolve_model

from .experts import split_experts
from .lora import adapt_model, flat_to_tensors, load_trainable, num_blocks, tensors_to_flat, trainable_params
from .quant import BLOCKSIZE, quant_kind

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(cfg: ForgeConfig):
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    if device().type == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_base(model_spec: str, dtype=torch.float32):
    """(model on the CPU in `dtype`, tokenizer, model_dir), nothing quantized yet."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    model_dir = Path(resolve_model(model_spec))
    hf_cfg = json.loads((model_dir / "config.json").read_text())
    if hf_cfg.get("quantization_config") or hf_cfg.get("quantization"):
        raise ForgeError(f"{model_dir} is already quantized; give forge the full-precision model "
                         "(forge quantizes the PiSSA residual itself)")
    kwargs = {"dtype": dtype, "trust_remote_code": False, "use_safetensors": True}
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # forge prints its own one line about the model
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa", **kwargs)
        except ValueError as e:  # this architecture has no SDPA attention (gemma2, gpt-oss): its eager one
            if not any(w in str(e).lower() for w in ("sdpa", "scaled_dot_product_attention")):
                raise
            model = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager", **kwargs)
    except (ValueError, OSError, KeyError) as e:  # unsupported model_type, missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ForgeError(f"{model_dir}: transformers cannot load this model ({first[:200]})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    split_experts(model)
    return model, load_tokenizer(model_dir), model_dir


def build_model(cfg: ForgeConfig, pissa_init: dict | None = None, adapter_weights: dict | None = None):
    """Base -> PiSSA/LoRA on targets -> quantize (residual + rest) -> device. Returns (model, tokenizer, model_dir, factors)."""
    dtype = compute_dtype(cfg)
    model, tokenizer, model_dir = load_base(cfg.model.path, dtype)
    factors = adapt_model(model, cfg, pissa_init=_renamed(pissa_init, model, to_torch=True), device=device(),
                          compute_dtype=dtype)
    release_checkpoint(model)
    if adapter_weights is not None:
        load_trainable(model, _renamed(adapter_weights, model, to_torch=True, keys=True))
    model.forge_chunked_loss = cfg.train.chunked_loss  # read by head.head_weight
    return model, tokenizer, model_dir, _renamed(factors, model, to_torch=False)


def _renamed(named: dict | None, model: nn.Module, to_torch: bool, keys: bool = False) -> dict | None:
    """Module paths between this model's (`<block>.mlp.experts.gate_proj`) and the adapters' (mlx-lm's
    `<block>.<moe>.switch_mlp.gate_proj`, forge_core/models/experts.py); `keys`: {"<module>.<tensor>": ...}."""
    if named is None:
        return None
    model_type = model.config.model_type
    rename = (lambda p: torch_path(model_type, p)) if to_torch else (lambda p: canonical_path(model_type, p))
    if not keys:
        return {rename(p): v for p, v in named.items()}
    return {f"{rename(k.rsplit('.', 1)[0])}.{k.rsplit('.', 1)[1]}": v for k, v in named.items()}


def release_checkpoint(model: nn.Module) -> None:
    """On the CPU the loaded weights may still be views of the checkpoint file transformers memory-mapped (when
    its dtype is the compute dtype): the embeddings, norms and biases that surgery left as they were keep the
    whole mapping, every page the build read, resident (SmolLM2-135M's fp32 file: 0.4 GiB of RSS through the
    run). Copies of them let it go; the plan counts them as the model's own memory already."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.device.type == "cpu" and not t.requires_grad and type(t) in (torch.Tensor, nn.Parameter):
                t.data = t.data.clone()
    gc.collect()


# ---------------------------------------------------------------- adapter directory (PEFT layout)

def quant_meta(cfg: ForgeConfig) -> dict:
    kind = quant_kind(cfg.quant)
    return {"bits": cfg.quant.bits, "mode": kind or "none", "blocksize": BLOCKSIZE if kind else None,
            "double_quant": cfg.quant.double_quant if kind in ("nf4", "fp4") else False,
            "compute_dtype": str(compute_dtype(cfg)).replace("torch.", "")}


def save_adapter(out_dir, model: nn.Module, cfg: ForgeConfig, factors: dict, model_dir: Path,
                 extra: dict | None = None) -> Path:
    """Write adapter_model.safetensors + adapter_config.json + forge.json (+ pissa_init.safetensors), atomically."""
    blocks = num_blocks(model)
    meta = training_meta(cfg, "cuda", model_dir, factors, blocks, quant_meta(cfg), extra)
    flat = _renamed({k: v.detach().float().cpu().numpy() for k, v in trainable_params(model).items()}, model,
                    to_torch=False, keys=True)
    return save_trained(out_dir, *flat_to_tensors(flat), cfg, factors, meta, "peft", blocks)


def load_adapter_dir(path):
    """(config, adapter weights {trainable name: np}, pissa factors or None) from a forge adapter dir.

    Either layout reads: PEFT (this backend) or mlx-lm (forge_mlx), via forge_core.adapters.formats.
    """
    cfg, adapter = read_trained(path)
    return cfg, tensors_to_flat(adapter.tensors, adapter.magnitudes), adapter.pissa_init


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (packed quantized weights counted as stored elements)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block (transformers' own, non-reentrant): recompute
    activations in backward. Parameter names are unchanged."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
