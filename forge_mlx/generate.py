"""Generation on MLX for `forge generate` / `forge eval` (forge_core/evaluate.py): chat template, mlx-lm's generator.

On the CPU, inference dequantizes each 4-bit layer ONCE into a dense fp32 copy of the same values
(Q(W_res), bit for bit): token-by-token decoding would otherwise dequantize every layer for every
token. Training keeps weights packed and dequantizes per call (quant.py).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .quant import QuantLinear


def densify_for_cpu(model: nn.Module) -> None:
    """Replace QuantLinear layers by nn.Linear with their dequantized weights (CPU inference only)."""
    if mx.default_device() != mx.cpu:
        return
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out_dims, _ = m.weight.shape
            dense = nn.Linear(m.weight.shape[1] * 32 // m.bits, out_dims, bias="bias" in m)
            dense.weight = m.dequantized(mx.float32)
            if "bias" in m:
                dense.bias = m.bias
            swaps.append((path, dense))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
        mx.eval(model.parameters())


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    if getattr(hf, "chat_template", None):
        out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return hf.encode("\n".join(m["content"] for m in messages))


def complete(model, tokenizer, messages: list[dict], max_tokens: int, temp: float = 0.0, stream=None) -> str:
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    text = ""
    for resp in stream_generate(model, tokenizer, _chat_prompt(tokenizer, messages), max_tokens=max_tokens,
                                sampler=make_sampler(temp)):
        text += resp.text
        if stream:
            stream(resp.text)
    return text
