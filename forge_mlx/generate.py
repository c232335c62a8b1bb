"""`forge generate` and `forge eval` on MLX: base (+ adapter), chat template, mlx-lm's generator.

On the CPU, inference dequantizes each 4-bit layer ONCE into a dense fp32 copy of the same values
(Q(W_res), bit for bit): token-by-token decoding would otherwise dequantize every layer for every
token. Training keeps weights packed and dequantizes per call (quant.py).
"""

from __future__ import annotations

import math
import sys

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from forge_core.config import ForgeConfig
from forge_core.loop import task_metrics

from .model import load_adapted
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


def generate(model=None, adapter=None, prompt="", system="", max_tokens=96, temp=0.0) -> str:
    net, tokenizer, _ = load_adapted(adapter, model)
    densify_for_cpu(net)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = complete(net, tokenizer, messages, max_tokens, temp,
                    stream=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
    sys.stdout.write("\n")
    return text


def heldout_loss(model, tokenizer, cfg: ForgeConfig, path: str) -> dict:
    from forge_core import data as fdata

    from .losses import sft_loss

    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    rows, _ = fdata.load_sft(path, hf, cfg.data, cfg.train.max_seq_len)
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    total = count = 0.0
    for s in range(0, len(rows), cfg.train.batch_size):
        b = fdata.collate_sft(rows[s:s + cfg.train.batch_size], pad, max_len=cfg.train.max_seq_len)
        ls, c = sft_loss(model, {k: mx.array(v) for k, v in b.items()})
        total, count = total + ls.item(), count + c.item()
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50)), "tokens": int(count)}


def evaluate(cfg: ForgeConfig, adapter: str | None = None, model_spec: str | None = None) -> dict:
    """Held-out loss/perplexity and, when the metric applies, the task metric by greedy generation."""
    net, tokenizer, saved = load_adapted(adapter, model_spec or (cfg.model.path if not adapter else None))
    densify_for_cpu(net)
    net.eval()
    path = cfg.data.valid or cfg.data.train
    result = heldout_loss(net, tokenizer, cfg, path)
    result.update(task_metrics(cfg, path, lambda msgs: complete(net, tokenizer, msgs, cfg.eval.max_new_tokens)))
    return result


def evaluate_preferences(cfg: ForgeConfig, adapter: str | None = None) -> dict:
    """On the held-out pairs: how often the model itself prefers chosen (log π(y_w) > log π(y_l))."""
    import numpy as np

    from forge_core import data as fdata

    from .losses import sequence_logps

    net, tokenizer, _ = load_adapted(adapter, None if adapter else cfg.model.path)
    densify_for_cpu(net)
    net.eval()
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    rows, _ = fdata.load_preferences(cfg.data.valid or cfg.data.train, hf, cfg.data, cfg.train.max_seq_len)
    pad = fdata.pad_token_id(hf)
    margins, cap = [], fdata.loss_row_cap(rows)
    for s in range(0, len(rows), cfg.train.batch_size):
        chunk = rows[s:s + cfg.train.batch_size]
        b = {k: mx.array(v) for k, v in fdata.add_loss_positions(fdata.collate_dpo(chunk, pad), cap).items()}
        lp = np.array(sequence_logps(net, b))
        margins.append(lp[:len(chunk)] - lp[len(chunk):])
    m = np.concatenate(margins)
    return {"pref_accuracy": float((m > 0).mean()), "logp_margin": float(m.mean()), "pairs": int(len(m))}
