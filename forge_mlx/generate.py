"""Generation on MLX for `forge generate` / `forge eval` (forge_core/eval/evaluate.py, generation.py): mlx-lm's
generators (stream_generate for one streamed answer, BatchGenerator for many, with a per-row logits processor
where a row's decoding is constrained).

On the CPU, inference first folds each layer into one dense fp32 matrix (for_inference): an adapted layer
becomes Q(W_res) + s·BA, any other 4-bit layer its dequantized values. Token-by-token decoding would
otherwise dequantize every layer for every token, and run two small extra matmuls per adapted layer
(measured on SmolLM2, docs/BENCHMARKS.md: ~20% of a decode step). Training keeps weights packed and the
adapter apart (quant.py, lora.py).
"""

from __future__ import annotations

from contextlib import contextmanager

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_unflatten

from forge_core.data.batches import shared_prefix
from forge_core.eval.generation import chat_prompt
from forge_core.surgery import fold_plan

from .experts import dense_switch
from .lora import LORA_LAYERS, QUANT_LAYERS


def _dense(layer: nn.Module, weight: mx.array) -> nn.Module:
    if weight.ndim == 3:  # an expert stack
        return dense_switch(layer, weight)
    out_dims, in_dims = weight.shape
    dense = nn.Linear(in_dims, out_dims, bias="bias" in layer)
    dense.weight = weight
    if "bias" in layer:
        dense.bias = layer.bias
    return dense


def _dense_layers(model: nn.Module, cache: dict) -> list[tuple[str, nn.Module, nn.Module]]:
    """(path, dense nn.Linear, the layer it stands for) of every LoRALinear (its adapter folded in: W_res + s·BA, or
    DoRA's) and every other QuantLinear (dequantized). The bases' dense fp32 weights are taken from `cache` by path,
    and put there when missing."""
    modules = dict(model.named_modules())
    kinds = ((p, "lora" if isinstance(m, LORA_LAYERS) else "quantized" if isinstance(m, QUANT_LAYERS) else "")
             for p, m in modules.items())
    out = []
    for path, kind in fold_plan(kinds):
        m = modules[path]
        if path not in cache:
            cache[path] = m.base_weight() if kind == "lora" else m.dequantized(mx.float32)
        out.append((path, m.fuse(cache[path]) if kind == "lora" else _dense(m, cache[path]), m))
    return out


def for_inference(model: nn.Module) -> None:
    """CPU only: each LoRALinear folded into a dense nn.Linear, and each other QuantLinear dequantized, once."""
    if mx.default_device() != mx.cpu:
        return
    swaps = _dense_layers(model, {})
    if swaps:
        model.update_modules(tree_unflatten([(path, dense) for path, dense, _ in swaps]))
    mx.eval(model.parameters())


@contextmanager
def sampling_weights(model: nn.Module, cache: dict):
    """CPU only (GRPO's sampling from the model it trains): for the generation, each adapted layer becomes ONE dense
    matrix W_res + s·BA and each other quantized layer its dequantized values; the training layers go back after.
    The dequantized residuals are kept in `cache` between generations (the base is frozen), so each generation
    folds only the adapters: the cost is a dense fp32 copy of the quantized weights for the run (4 bytes/param)."""
    if mx.default_device() != mx.cpu:
        yield
        return
    swaps = _dense_layers(model, cache)
    mx.eval([dense.weight for _, dense, _ in swaps])
    model.update_modules(tree_unflatten([(path, dense) for path, dense, _ in swaps]))
    try:
        yield
    finally:
        model.update_modules(tree_unflatten([(path, layer) for path, _, layer in swaps]))


def complete(model, tokenizer, messages: list[dict], max_tokens: int, temp: float = 0.0, stream=None) -> str:
    """One answer with mlx-lm's stream_generate; its text is the tokens decoded without special tokens, as
    forge_core/eval/generation.py and the torch backend decode (`stream` gets it piece by piece, as transformers'
    TextStreamer hands it out: never half a character)."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    ids, shown = [], ""
    for resp in stream_generate(model, tokenizer, chat_prompt(hf, messages), max_tokens=max_tokens,
                                sampler=make_sampler(temp)):
        ids.append(resp.token)
        text = hf.decode(ids, skip_special_tokens=True)
        if stream and text.startswith(shown) and not text.endswith("\ufffd"):
            stream(text[len(shown):])
            shown = text
    text = hf.decode(ids, skip_special_tokens=True)
    if stream and text != shown and text.startswith(shown):
        stream(text[len(shown):])
    return text


class _Constrained:
    """An mlx-lm logits processor for one row: the logits of the ids its constraint does not allow (forge_core/
    copy_constraint.py) go to -inf. mlx-lm calls it once per new token with the row's tokens so far, the last one
    being the token sampled at the previous call."""

    def __init__(self, constraint):
        self.constraint, self.generated, self.calls = constraint, [], 0

    def __call__(self, context: mx.array, logits: mx.array) -> mx.array:
        if self.calls:
            self.generated.append(int(context[-1].item()))
        self.calls += 1
        allowed = self.constraint.allowed(self.generated)
        if allowed is None:
            return logits
        mask = np.full(logits.shape[-1], -np.inf, np.float32)
        mask[[t for t in allowed if t < mask.size]] = 0.0  # a tokenizer may know ids the model has no logit for
        return logits + mx.array(mask).astype(logits.dtype)


def generate_tokens(model, tokenizer, prompts: list[list[int]], max_tokens: int, temp: float = 0.0,
                    batch_size: int = 32, top_p: float = 1.0, stop: list[int] | None = None,
                    constraints: list | None = None) -> list[list[int]]:
    """The new token ids (stop token left out) after each prompt, `batch_size` rows decoded at once (mlx-lm's
    continuous batching: a row that stops makes room for the next). The tokens all prompts start with (a
    shared system prompt) are run once into a KV cache that every row starts from. Greedy ids equal
    stream_generate's. `constraints`: per prompt, None or an object whose allowed(generated ids) limits the
    next token (forge_core/datagen/copy_constraint.py)."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    if not prompts:
        return []
    size = max(1, min(batch_size, len(prompts)))
    n = shared_prefix(prompts)
    caches = None
    if n:
        cache = make_prompt_cache(model)
        model(mx.array([list(prompts[0][:n])]), cache=cache)
        mx.eval([c.state for c in cache])
        caches = [cache] * len(prompts)  # the generator merges them into its own batch cache, never in place
    ends = tokenizer.eos_token_ids if stop is None else stop  # only these ids end a row
    gen = BatchGenerator(model, stop_tokens=[[t] for t in ends], max_tokens=max_tokens,
                         sampler=make_sampler(temp, top_p=top_p if top_p < 1.0 else 0.0),
                         prefill_batch_size=size, completion_batch_size=size)
    processors = [[_Constrained(c)] if c is not None else [] for c in constraints] if constraints else None
    try:
        uids = gen.insert([list(p[n:]) for p in prompts], caches=caches, logits_processors=processors)
        out = {uid: [] for uid in uids}
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    out[r.uid].append(r.token)
    finally:
        gen.close()
    return [out[uid] for uid in uids]
