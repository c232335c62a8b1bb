"""Loading a base model through mlx-lm's model classes, adapting it, and the adapter dir on disk.

Any architecture mlx-lm supports loads here (Llama, Qwen2/3, Mistral, Gemma, Phi...): we hand
mlx-lm a local HF dir from forge_core.models.sources and keep its parameter names, so adapter keys are
mlx-lm's own. Compute dtype: fp32 on the CPU (bf16 is slow there and the BLAS is fp32), bf16 on
Metal/CUDA, unless model.dtype says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from forge_core.adapters.forge_json import training_meta
from forge_core.adapters.formats import read_trained, save_trained
from forge_core.adapters.mapping import collect, flatten, parse_mlx_key
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.models.sources import resolve_model

from . import cpu_math
from .lora import adapt_model, load_trainable, trainable_params
from .quant import adopt_quantized

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def compute_dtype(cfg: ForgeConfig):
    if cfg.model.dtype != "auto":
        return DTYPES[cfg.model.dtype]
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def load_base(model_spec: str, dtype=mx.float32, lazy: bool = False, quantized_ok: bool = False):
    """(model, tokenizer wrapper, model_dir) with weights cast to `dtype`, nothing quantized yet.

    lazy=True leaves the weights unevaluated (read from the safetensors on first use), so model
    surgery can materialize, factorize and quantize one linear at a time: the dense model is never
    resident as a whole. quantized_ok: an already quantized model is fine (inference on an export's
    AWQ / GPTQ / rtn model); training refuses it.
    """
    import mlx_lm.utils

    model_dir = Path(resolve_model(model_spec))
    try:
        model, _ = mlx_lm.utils.load_model(model_dir, lazy=True)
    except ValueError as e:  # unsupported model_type and similar
        raise ForgeError(f"{model_dir}: mlx-lm cannot load this model ({e})") from None
    tokenizer = mlx_lm.utils.load_tokenizer(model_dir)
    if not quantized_ok and any(isinstance(m, (nn.QuantizedLinear, QuantizedSwitchLinear))
                                for _, m in model.named_modules()):
        raise ForgeError(f"{model_dir} is already quantized; give forge the full-precision model "
                         "(forge quantizes the PiSSA residual itself)")
    model.set_dtype(dtype)
    if quantized_ok:
        adopt_quantized(model)
    if not lazy:
        mx.eval(model.parameters())
    return model, tokenizer, model_dir


def build_model(cfg: ForgeConfig, pissa_init: dict | None = None, adapter_weights: dict | None = None):
    """Base -> PiSSA/LoRA on targets -> quantize (residual + rest). Returns (model, tokenizer, model_dir, factors)."""
    model, tokenizer, model_dir = load_base(cfg.model.path, compute_dtype(cfg), lazy=True)
    cpu_math.install(model, cfg.model.fast_cpu_math)
    model.forge_chunked_loss = cfg.train.chunked_loss  # read by head.position_nll
    factors = adapt_model(model, cfg, pissa_init=pissa_init)
    if adapter_weights is not None:
        load_trainable(model, {k: mx.array(v) for k, v in adapter_weights.items()})
    mx.eval(model.parameters())
    return model, tokenizer, model_dir, factors


# ---------------------------------------------------------------- adapter directory (mlx-lm layout)

def save_adapter(out_dir, model: nn.Module, cfg: ForgeConfig, factors: dict, model_dir: Path,
                 extra: dict | None = None) -> Path:
    """adapters.safetensors + adapter_config.json + forge.json (+ pissa_init.safetensors), atomically, through
    forge_core/adapters (the same forge.json as forge_cuda's)."""
    flat = {k: np.array(v.astype(mx.float32)) for k, v in trainable_params(model).items()}
    tensors, magnitudes = collect(flat, parse_mlx_key, "adapter", transposed=True)
    quantization = {"bits": cfg.quant.bits, "group_size": cfg.quant.group_size, "mode": "affine"}
    meta = training_meta(cfg, "mlx", model_dir, factors, len(model.layers), quantization, extra)
    return save_trained(out_dir, tensors, magnitudes, cfg, factors, meta, "mlx", len(model.layers))


def load_adapter_dir(path):
    """(config, adapter weights {mlx-lm key: np}, pissa factors or None) of a forge adapter dir, either layout."""
    cfg, adapter = read_trained(path)
    return cfg, flatten(adapter.tensors, adapter.magnitudes, "mlx"), adapter.pissa_init


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (packed quantized weights counted as stored elements)."""
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    return trainable, total


def checkpoint_blocks(model: nn.Module) -> None:
    """Gradient checkpointing per transformer block: recompute activations in backward.

    Each block gets its own subclass with a checkpointed __call__, so parameter paths (and adapter
    keys) stay unchanged and no other model in the process is affected.
    """
    for block in model.layers:
        cls = type(block)
        call = cls.__call__

        # Every parameter goes in, the frozen ones too: the recomputation then reads them through the
        # checkpoint's inputs, so a compiled step cannot merge it with the forward's (a quantized weight's
        # dequantized copy would otherwise stay alive from the forward to the backward, in every block:
        # +300 MiB on SmolLM2-135M at 4 bits, the dense model on a bigger one). Frozen ones get no gradient
        # evaluated: nothing asks for it.
        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.parameters(), *args, **kwargs)

        block.__class__ = type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": checkpointed})
