"""Generation on PyTorch for `forge generate` / `forge eval` (forge_core/eval/evaluate.py, generation.py):
transformers' generate() (streamed for one answer, left-padded batches for many).

On the CPU, inference first folds each layer into one dense nn.Linear (for_inference): an adapted layer
becomes Q(W_res) + s·BA, any other 4/8-bit layer its dequantized values. Token-by-token decoding would
otherwise dequantize every layer for every token and run two small extra matmuls per adapted layer.
Training keeps weights packed and the adapter apart (quant.py, lora.py). Sampling: greedy at temp 0, else
temperature sampling with no top-k and, where the caller gives one (GRPO's grpo.top_p), nucleus sampling - as
forge_mlx does.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from forge_core.eval.generation import chat_prompt
from forge_core.surgery import fold_plan

from .experts import LoRAExperts
from .lora import LoRALinear
from .quant import is_quantized, set_module


def _dense_layers(model: nn.Module, cache: dict) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, dense nn.Linear in the model's compute dtype, the layer it stands for) of every LoRALinear (its adapter
    folded in: W_res + s·BA, or DoRA's) and every other quantized linear (dequantized). The bases' dense fp32
    weights are taken from `cache` by path, and put there when missing."""
    dtype = model.get_input_embeddings().weight.dtype
    modules = dict(model.named_modules())
    kinds = ((p, "lora" if isinstance(m, (LoRALinear, LoRAExperts)) else "quantized" if is_quantized(m) else "")
             for p, m in modules.items())
    out = []
    with torch.no_grad():
        for path, kind in fold_plan(kinds):
            m = modules[path]
            if path not in cache:
                cache[path] = m.base_weight() if kind == "lora" else m.dequantized(torch.float32)
            dense = m.fuse(cache[path]).to(dtype).requires_grad_(False) if kind == "lora" else \
                dense_linear(m, cache[path], dtype)
            out.append((path, dense, m))
    return out


@torch.no_grad()
def dense_linear(layer: nn.Module, weight: torch.Tensor, dtype) -> nn.Linear:
    """A frozen nn.Linear in `dtype` holding `weight` (out, in) and `layer`'s bias: a quantized layer made dense."""
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    dense.weight.copy_(weight)
    if layer.bias is not None:
        dense.bias.copy_(layer.bias.float())
    return dense.to(dtype).requires_grad_(False)


def for_inference(model: nn.Module) -> None:
    """CPU only: each LoRALinear folded into a dense nn.Linear, and each other quantized linear dequantized, once,
    in the dtype the model computes in (its embedding's)."""
    if next(model.parameters()).device.type != "cpu":
        return
    for path, dense, _ in _dense_layers(model, {}):
        set_module(model, path, dense)


@contextmanager
def sampling_weights(model: nn.Module, cache: dict):
    """CPU only (GRPO's sampling from the model it trains): for the generation, each adapted layer becomes ONE dense
    nn.Linear W_res + s·BA and each other quantized layer its dequantized values; the training layers go back
    after. The dequantized residuals stay in `cache` between generations (the base is frozen): a dense copy of
    the quantized weights for the run. On a GPU the bitsandbytes kernels decode as they are: nothing changes."""
    if next(model.parameters()).device.type != "cpu":
        yield
        return
    swaps = _dense_layers(model, cache)
    for path, dense, _ in swaps:
        set_module(model, path, dense)
    try:
        yield
    finally:
        for path, _, layer in swaps:
            set_module(model, path, layer)


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


def _generation_config(model, tokenizer, max_tokens: int, temp: float, top_p: float = 1.0, stop=None):
    """transformers' GenerationConfig for forge's sampling, and the ids that end an answer."""
    from transformers import GenerationConfig

    stop = sorted(stop) if stop is not None else _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [0])[0]
    sampling = {"do_sample": True, "temperature": temp, "top_k": 0, "top_p": top_p} if temp > 0 else {"do_sample": False}
    return GenerationConfig(max_new_tokens=max_tokens, eos_token_id=stop or None, pad_token_id=pad, **sampling), stop


@torch.no_grad()
def complete(model, tokenizer, messages: list[dict], max_tokens: int, temp: float = 0.0, stream=None) -> str:
    model.eval()
    ids = chat_prompt(tokenizer, messages)
    inputs = torch.tensor([ids], device=next(model.parameters()).device)
    gen, _ = _generation_config(model, tokenizer, max_tokens, temp)
    out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=gen,
                         streamer=_streamer(tokenizer, stream) if stream else None)
    return tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


class _Constrained:
    """A transformers logits processor: in each constrained row the logits of the ids its constraint does not allow
    (forge_core/datagen/copy_constraint.py) go to -inf. The row's new tokens are those after the padded prompt width."""

    def __init__(self, constraints: list, width: int):
        self.constraints, self.width = constraints, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, constraint in enumerate(self.constraints):
            allowed = constraint.allowed(input_ids[row, self.width:].tolist()) if constraint is not None else None
            if allowed is not None:
                keep = torch.full_like(scores[row], float("-inf"))
                keep[[t for t in allowed if t < keep.numel()]] = 0.0  # ids the tokenizer knows, the model may not
                scores[row] += keep
        return scores


@torch.no_grad()
def generate_tokens(model, tokenizer, prompts: list[list[int]], max_tokens: int, temp: float = 0.0,
                    batch_size: int = 32, top_p: float = 1.0, stop: list[int] | None = None,
                    constraints: list | None = None) -> list[list[int]]:
    """The new token ids (stop token left out) after each prompt, `batch_size` left-padded rows per generate()
    call (the attention mask hides the padding; transformers derives the positions from it). `constraints`: per
    prompt, None or an object whose allowed(generated ids) limits the next token."""
    from transformers import LogitsProcessorList

    model.eval()
    device = next(model.parameters()).device
    gen, stop = _generation_config(model, tokenizer, max_tokens, temp, top_p, stop)
    size = max(1, batch_size)
    out_ids = []
    for s in range(0, len(prompts), size):
        chunk = [list(p) for p in prompts[s:s + size]]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), gen.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
        rows = constraints[s:s + size] if constraints else []
        extra = LogitsProcessorList([_Constrained(rows, width)] if any(c is not None for c in rows) else [])
        out = model.generate(ids.to(device), attention_mask=mask.to(device), generation_config=gen,
                             logits_processor=extra)
        for row in out[:, width:].tolist():
            # a finished row is filled with padding up to the longest: cut at its first stop id
            out_ids.append(row[:next((k for k, t in enumerate(row) if t in stop), len(row))])
    return out_ids
