"""Generation on PyTorch for `forge generate` / `forge eval` (forge_core/evaluate.py): chat template,
transformers' generate().

On the CPU, inference dequantizes each 4/8-bit layer ONCE into a dense fp32 nn.Linear with the same
values (Q(W_res), bit for bit): token-by-token decoding would otherwise dequantize every layer for every
token. Training keeps weights packed (quant.py). Sampling: greedy at temp 0, else plain temperature
sampling (no top-k / top-p), as forge_mlx does.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import is_quantized, set_module


def densify_for_cpu(model: nn.Module) -> None:
    """Replace quantized linears by nn.Linear with their dequantized weights (CPU inference only)."""
    if next(model.parameters()).device.type != "cpu":
        return
    for path, m in [(p, m) for p, m in model.named_modules() if is_quantized(m)]:
        dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(m.dequantized(torch.float32))
            if m.bias is not None:
                dense.bias.copy_(m.bias.float())
        set_module(model, path, dense.requires_grad_(False))


def _chat_prompt(tokenizer, messages: list[dict]) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)
    return tokenizer.encode("\n".join(m["content"] for m in messages))


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(ids)


def _streamer(tokenizer, callback):
    """A transformers TextStreamer that hands each finished piece of text to `callback`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            if text:
                callback(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def complete(model, tokenizer, messages: list[dict], max_tokens: int, temp: float = 0.0, stream=None) -> str:
    from transformers import GenerationConfig

    model.eval()
    ids = _chat_prompt(tokenizer, messages)
    device = next(model.parameters()).device
    inputs = torch.tensor([ids], device=device)
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    sampling = {"do_sample": True, "temperature": temp, "top_k": 0, "top_p": 1.0} if temp > 0 else {"do_sample": False}
    gen = GenerationConfig(max_new_tokens=max_tokens, eos_token_id=stop or None, pad_token_id=pad, **sampling)
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=gen,
                         streamer=_streamer(tokenizer, stream) if stream else None)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
