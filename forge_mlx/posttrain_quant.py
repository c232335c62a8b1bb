"""Post-training quantization of a merged checkpoint with mlx-lm's own quantizers - AWQ (mlx_lm.quant.awq) and GPTQ
(mlx_lm.quant.gptq), not re-implemented here - calibrated on token rows forge hands over (by default the run's own
training rows, chat-templated as they were trained), saved as an mlx-lm model directory (mlx_lm.load reads it).

    awq   per-channel scales searched to keep each block's output (n_grid points), then clipping; the embeddings and
          head at embed_bits (4, groups of 32), as mlx-lm's AWQ does
    gptq  each linear's columns rounded in order with the error pushed onto the rest through the inverse Hessian of
          its inputs; layers GPTQ does not handle (the embeddings) at fallback_bits (6)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from forge_core.errors import ForgeError

from .quant import adopt_quantized

N_GRID = 20  # AWQ's scale / clip search points (mlx-lm's default)
EMBED_BITS, EMBED_GROUP = 4, 32  # AWQ's embeddings and head (mlx-lm's defaults)
FALLBACK_BITS = 6  # GPTQ's layers it does not quantize itself (mlx-lm's default)


@contextlib.contextmanager
def _fast_quantized_blocks(awq_module):
    """AWQ measures each block's loss twice with the block quantized (nn.quantize, then a forward over every
    calibration token). On the CPU mlx-lm's quantized layers call mx.quantized_matmul, whose CPU kernel made that
    ~90% of AWQ's time here (223 s for the 135M model's first block of 30). Inside this block awq.py's `nn.quantize`
    also hands the layers forge's dequant path (quant.adopt_quantized: the same packed weights, the same product, a
    subclass of mlx-lm's layers, so its config and save read them as theirs). Only awq.py's own name is rebound."""
    if mx.default_device() != mx.cpu:
        yield
        return
    real = awq_module.nn

    class _NN:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def quantize(module, *args, **kwargs):
            out = real.quantize(module, *args, **kwargs)
            adopt_quantized(module)
            return out

    awq_module.nn = _NN()
    try:
        yield
    finally:
        awq_module.nn = real


def quantize_checkpoint(src: Path, dst: Path, method: str, bits: int, group_size: int, tokens: np.ndarray) -> None:
    """src (a float checkpoint) -> dst (an mlx-lm quantized model) by `method`, calibrated on `tokens` (N, T)."""
    from mlx_lm.utils import load, save

    model, tokenizer, config = load(str(src), lazy=True, return_config=True)
    data = mx.array(tokens.astype(np.int32))
    if method == "awq":
        from mlx_lm.quant.awq import AWQ_MODEL_CONFIGS, awq_quantize, update_config

        awq_config = AWQ_MODEL_CONFIGS.get(config.get("model_type"))
        if awq_config is None:
            raise ForgeError(f"--quantize awq: mlx-lm's AWQ has no recipe for {config.get('model_type')} models "
                             f"(it has {', '.join(sorted(AWQ_MODEL_CONFIGS))}); use --quantize gptq or rtn")
        import mlx_lm.quant.awq as awq_module

        with _fast_quantized_blocks(awq_module):
            awq_quantize(model, data, awq_config, group_size=group_size, bits=bits, embed_group_size=EMBED_GROUP,
                         embed_bits=EMBED_BITS, n_grid=N_GRID)
        config = update_config(model, config)
    elif method == "gptq":
        from mlx_lm.quant.gptq import gptq_quantize

        model, config["quantization"] = gptq_quantize(model, data, bits, group_size, FALLBACK_BITS, group_size,
                                                      batch_size=min(8, len(tokens)))
    else:
        raise ForgeError(f"--quantize {method}: choose rtn, awq or gptq")
    config.pop("quantization_config", None)
    save(str(dst), str(src), model, tokenizer, config)
