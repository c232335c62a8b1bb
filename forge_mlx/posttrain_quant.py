"""Post-training quantization of a merged checkpoint with mlx-lm's own quantizers - AWQ (mlx_lm.quant.awq), GPTQ
(mlx_lm.quant.gptq) and DWQ (mlx_lm.quant.dwq), not re-implemented here - calibrated on token rows forge hands over
(by default the run's own training rows, chat-templated as they were trained), saved as an mlx-lm model directory
(mlx_lm.load reads it).

    awq   per-channel scales searched to keep each block's output (n_grid points), then clipping; the embeddings and
          head at embed_bits (4, groups of 32), as mlx-lm's AWQ does
    gptq  each linear's columns rounded in order with the error pushed onto the rest through the inverse Hessian of
          its inputs; layers GPTQ does not handle (the embeddings) at fallback_bits (6)
    dwq   the rtn model (the same layers quantized as --quantize rtn), then its scales and biases trained to match
          the float merge's output distribution on the rows (KL at temperature 2, Adam at mlx-lm's defaults)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from forge_core.adapters.calibration import MIN_SEQUENCES
from forge_core.errors import ForgeError

from .quant import adopt_quantized, dense_weight

N_GRID = 20  # AWQ's scale / clip search points (mlx-lm's default)
EMBED_BITS, EMBED_GROUP = 4, 32  # AWQ's embeddings and head (mlx-lm's defaults)
FALLBACK_BITS = 6  # GPTQ's layers it does not quantize itself (mlx-lm's default)
DWQ_LR, DWQ_TEMPERATURE, DWQ_BATCH = 1e-6, 2.0, 4  # mlx_lm.quant.dwq's defaults
DWQ_STEPS = 100  # at least this many steps: the rows are repeated (a run's rows are far fewer than DWQ's 2048)


@contextlib.contextmanager
def _fast_quantized_blocks(awq_module):
    """AWQ measures each block's loss twice with the block quantized (nn.quantize, then a forward over every
    calibration token). On the CPU mlx-lm's quantized layers call mx.quantized_matmul, whose slow CPU kernel made that
    ~60% of AWQ's time here (the 135M model's first block: 223 s, 85 s with this). Inside this block
    mlx_lm.quant.awq's `nn.quantize` also hands the layers forge's dequant path (quant.adopt_quantized: the same packed
    weights, the same product, a subclass of mlx-lm's layers, so its config and save read them as theirs). Only that
    module's name `nn` is rebound."""
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


class _TrainableDequant:
    """DWQ on the CPU: a quantized layer computing x @ dequant(W)ᵀ by plain ops, so the gradient reaches its scales
    and biases (mx.quantized_matmul's CPU kernel is the slow one; forge's own dequant path freezes them)."""

    def __call__(self, x):
        w = dense_weight(self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode)
        y = x @ w.astype(x.dtype).T
        return y + self.bias if "bias" in self else y


@contextlib.contextmanager
def _trainable_on_cpu(model):
    from mlx import nn

    if mx.default_device() != mx.cpu:
        yield
        return
    swapped = [m for _, m in model.named_modules() if type(m) is nn.QuantizedLinear]
    cls = type("TrainableQuantizedLinear", (_TrainableDequant, nn.QuantizedLinear), {})
    for m in swapped:
        m.__class__ = cls
    try:
        yield
    finally:
        for m in swapped:
            m.__class__ = nn.QuantizedLinear


def _dwq(src: Path, teacher, tokens: np.ndarray, config: dict, bits: int, group_size: int, keep):
    """(the student, its config): `keep`'s layers quantized as rtn would, then mlx-lm's DWQ on the rows."""
    import math

    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize
    from mlx_lm.utils import load, quantize_model

    rows = [([int(t) for t in r], 0) for r in tokens]
    if len(rows) < MIN_SEQUENCES["dwq"]:  # calibration_tokens refuses this first, in its own words
        raise ForgeError(f"--quantize dwq: {len(rows)} calibration sequence(s); it needs {MIN_SEQUENCES['dwq']} at least")
    batch = min(DWQ_BATCH, len(rows) // 2)  # few rows (a small run): smaller batches, a train and a valid one at least
    n_valid = max(batch, len(rows) // 10)
    train, valid = rows[:-n_valid], rows[-n_valid:]
    train = train * math.ceil(DWQ_STEPS * batch / len(train))
    student = load(str(src), lazy=True)[0]
    student, config = quantize_model(student, config, group_size, bits, quant_predicate=keep)
    teacher.eval()
    with _trainable_on_cpu(student):
        dwq_quantize(student, lambda batch, idx, split: mx.stop_gradient(teacher(batch)),
                     optim.Adam(learning_rate=DWQ_LR, bias_correction=True), train, valid, batch,
                     tokens.shape[1] + 1, seed=0, dtype=mx.float32, temperature=DWQ_TEMPERATURE)
    student.eval()
    return student, config


def quantize_checkpoint(src: Path, dst: Path, method: str, bits: int, group_size: int, tokens: np.ndarray,
                        keep=None) -> None:
    """src (a float checkpoint) -> dst (an mlx-lm quantized model) by `method`, calibrated on `tokens` (N, T).
    `keep(path, module)`: which layers dwq quantizes (rtn's choice)."""
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
    elif method == "dwq":
        model, config = _dwq(src, model, tokens, config, bits, group_size, keep)
    else:
        raise ForgeError(f"--quantize {method}: choose rtn, awq, gptq or dwq")
    config.pop("quantization_config", None)
    save(str(dst), str(src), model, tokenizer, config)
