"""The output head kept apart from the body, so the loss can run it only where tokens are trained.

A llama-style mlx-lm model computes logits = head(model.model(inputs)): the vocabulary matmul and the
log-softmax over V (49152 for SmolLM2) at every position. With the prompt masked out of the loss only
the assistant tokens need them (about a third of the demo data), so the SFT loss gathers those
positions' hidden states first (`loss_positions` from forge_core.data.add_loss_positions) and runs
the head on them alone: same loss and gradients, a fraction of the head's work and memory.
Architectures whose __call__ does more than that (logit soft-capping, scaled logits) use the plain
full-logits path: the table of which is which is forge_core/models/architectures.py.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from forge_core.memory.constants import head_chunk_rows
from forge_core.models.architectures import architecture

from . import cpu_math
from .packing import packed_hidden


def splittable(model: nn.Module) -> bool:
    """Whether the logits are head(model.model(x)) alone (forge_core/models/architectures.py)."""
    return architecture(getattr(model, "model_type", None)).split_head and hasattr(model, "model")


def hidden(model: nn.Module, inputs: mx.array, batch: dict | None = None) -> mx.array:
    """Final-norm hidden states (B, T, D); packed batches keep attention inside each row."""
    if batch is not None and "segment_ids" in batch:
        return packed_hidden(model, inputs, batch["segment_ids"], batch["position_ids"])
    return model.model(inputs)


def logits(model: nn.Module, h: mx.array) -> mx.array:
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model.embed_tokens.as_linear(h)
    return model.lm_head(h)


def position_nll(model: nn.Module, h: mx.array, batch: dict, scale: float | mx.array | None = None) -> mx.array:
    """-log p(target) at batch["loss_positions"] only: h (B, T, D) hidden states -> (N,), float32; of the logits
    times `scale` when given (GRPO's 1 / temperature)."""
    pos = batch["loss_positions"]
    h, targets = h.reshape(-1, h.shape[-1])[pos], batch["targets"].reshape(-1)[pos]
    w = dense_head_weight(model) if getattr(model, "forge_chunked_loss", True) else None
    if w is not None:
        scale = scale.astype(mx.float32) if isinstance(scale, mx.array) else mx.array(1.0 if scale is None else scale)
        return chunked_nll(h, w, targets, scale)
    out = logits(model, h)
    return token_nll(out if scale is None else out.astype(mx.float32) * scale, targets)


def dense_head_weight(model: nn.Module) -> mx.array | None:
    """The (V, D) weight the logits are h @ Wᵀ of, when it is a plain dense matrix (tied embeddings or a bias-free
    lm_head): the chunked loss needs it. None for quantized or biased heads (the plain path)."""
    tied = getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head")
    layer = model.model.embed_tokens if tied else model.lm_head
    if type(layer) not in (nn.Embedding, nn.Linear) or "bias" in layer:
        return None
    return layer.weight


def chunked_nll(h: mx.array, w: mx.array, targets: mx.array, scale: mx.array) -> mx.array:
    """-log softmax(scale · h Wᵀ)[target] per row, (N,) float32, computed head_chunk_rows(V) rows at a time in
    the forward AND the backward: the (N, V) logits are never whole, so the head's memory is one chunk's
    whatever the number of positions (the fused linear cross-entropy of Liger / Unsloth). Costs one more
    h Wᵀ matmul (the backward recomputes each chunk's logits). Same values as token_nll on the full logits."""
    return _chunked_nll(h, w, targets, scale)[0]


def _chunks(n: int, vocab: int):
    size = head_chunk_rows(vocab)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _chunk_logits(h: mx.array, w: mx.array, scale: mx.array) -> mx.array:
    return (h @ w.T).astype(mx.float32) * scale


def _exp(x: mx.array) -> mx.array:
    return cpu_math.fast_exp(x) if cpu_math.active() else mx.exp(x)


@mx.custom_function
def _chunked_nll(h, w, targets, scale):
    nll, lse, after = [], [], []
    for s, e in _chunks(h.shape[0], w.shape[0]):
        z = _chunk_logits(_after(h[s:e], after), w, scale)
        m = z.max(axis=-1, keepdims=True)
        lse.append((m + mx.log(_exp(z - m).sum(axis=-1, keepdims=True))).squeeze(-1))
        nll.append(lse[-1] - mx.take_along_axis(z, targets[s:e, None], axis=-1).squeeze(-1))
        after = [nll[-1]]  # the next chunk's logits wait until this chunk's are used up
    return mx.concatenate(nll), mx.concatenate(lse)


@_chunked_nll.vjp
def _chunked_nll_vjp(primals, cotangents, outputs):
    """d nll / d z = softmax(z) - onehot(target) per chunk, z = scale · h Wᵀ recomputed from h. The gradient for W
    recomputes the chunks again in a graph of its own, so that it is only built, never run, when W is frozen (as
    forge's head always is), and holds no chunk of the h gradient's alive."""
    h, w, targets, scale = primals
    cot, lse = cotangents[0], outputs[1]

    def dz(s, e, after):
        g = cot[s:e, None] * _exp(_chunk_logits(_after(h[s:e], after), w, scale) - lse[s:e, None])
        return (g.at[mx.arange(e - s), targets[s:e]].subtract(cot[s:e]) * scale).astype(w.dtype)

    dh, dw, after = [], mx.zeros_like(w), []
    for s, e in _chunks(h.shape[0], w.shape[0]):
        dh.append(dz(s, e, after) @ w)
        after = [dh[-1]]
    after = []
    for s, e in _chunks(h.shape[0], w.shape[0]):
        dw = dw + dz(s, e, after).T @ h[s:e]
        after = [dw]
    return mx.concatenate(dh).astype(h.dtype), dw, mx.zeros_like(targets), mx.zeros_like(scale)


def _after(x: mx.array, arrays: list) -> mx.array:
    """x, computed only once `arrays` are (mx.depends): keeps one chunk's (rows, V) logits alive at a time."""
    return mx.depends([x], arrays)[0] if arrays else x


def token_nll(logits_: mx.array, targets: mx.array) -> mx.array:
    """-log p(target) per position, float32; forge's exp kernels on the CPU (cpu_math.py)."""
    if cpu_math.active():
        return cpu_math.nll(logits_, targets)
    return nn.losses.cross_entropy(logits_.astype(mx.float32), targets, reduction="none")
