"""Perplexity of any text file with a sliding window (`forge eval --text FILE`), as the Hugging Face docs and
mlx-lm's perplexity tool measure it, each token scored exactly once.

The text is tokenized whole. Windows of `window` tokens start every `stride` tokens; a window scores only the
tokens the previous window did not reach, so with stride < window every token after the first is predicted
once, from at least window - stride tokens of context (all of them in the first window). stride = window gives
plain non-overlapping chunks (mlx-lm's tool): there a chunk's first token has no context in its chunk and is
not scored. A smaller stride costs more forwards and gives each token more context, lowering the perplexity
toward the model's true one (the HF docs' choice is half the window).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np

from forge_core.errors import ForgeError


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored token) of each window over n tokens: tokens [first, end) are scored with
    ids[begin:end] as the window. Every token 1..n-1 is in at most one window's scored span; in exactly one
    when stride < window (stride = window leaves each later chunk's first token out)."""
    if window < 2 or not 0 < stride <= window:
        raise ForgeError(f"perplexity: need window >= 2 and 0 < stride <= window (got {window}, {stride})")
    out, prev_end, begin = [], 1, 0
    while prev_end < n:
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)  # a token is predicted from the one before it, inside the window
        if end > first:
            out.append((begin, end, first))
        prev_end = max(prev_end, end)
        begin += stride
    return out


def scored_batch(seqs: list, firsts: list[int], pad_id: int) -> dict[str, np.ndarray]:
    """A batch {inputs, targets, mask} of token sequences (right-padded to the widest): position t of row b
    predicts seqs[b][t + 1], and the mask is 1 on the targets from index firsts[b] of the sequence on."""
    width = max(len(q) for q in seqs) - 1
    inputs = np.full((len(seqs), width), pad_id, np.int32)
    targets = np.full((len(seqs), width), pad_id, np.int32)
    mask = np.zeros((len(seqs), width), np.float32)
    for b, (q, first) in enumerate(zip(seqs, firsts)):
        n = len(q) - 1
        inputs[b, :n], targets[b, :n] = q[:-1], q[1:]
        mask[b, max(first - 1, 0):n] = 1.0
    return {"inputs": inputs, "targets": targets, "mask": mask}


def window_batch(ids: np.ndarray, spans: list[tuple[int, int, int]], pad_id: int) -> dict[str, np.ndarray]:
    """scored_batch of windows (begin, end, first scored token) over ids."""
    return scored_batch([ids[b:e] for b, e, _ in spans], [f - b for b, _, f in spans], pad_id)


def read_text(path) -> str:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ForgeError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise ForgeError(f"{path}: not UTF-8 text (byte {e.start}); convert it first") from None
    if not text.strip():
        raise ForgeError(f"{path}: no text to score")
    return text


def text_perplexity(ops, model, tokenizer, path, window: int, stride: int = 0, batch_size: int = 4) -> dict:
    """Token-mean NLL and perplexity of the text in `path` (windows() above); stride 0 = window // 2."""
    hf = ops.hf_tokenizer(tokenizer)
    ids = np.asarray(hf(read_text(path))["input_ids"], np.int64)
    if len(ids) < 2:
        raise ForgeError(f"{path}: fewer than 2 tokens; nothing to predict")
    stride = stride or max(1, window // 2)
    spans = windows(len(ids), window, stride)
    pad = hf.pad_token_id if hf.pad_token_id is not None else 0
    loss_of = ops.no_grad(model, partial(ops.sft_loss, model), compiled=False)
    total = count = 0.0
    for s in range(0, len(spans), batch_size):
        loss_sum, n = loss_of(ops.to_batch(model, window_batch(ids, spans[s:s + batch_size], pad)))
        total, count = total + loss_sum.item(), count + n.item()
    loss = total / count
    return {"text_loss": loss, "text_ppl": math.exp(min(loss, 50)), "text_tokens": int(count),
            "window": window, "stride": stride}
