"""Packed sequences: several rows in one sequence, attention kept within each row, positions reset.

forge_core.data.pack gives segment_ids (which row a token belongs to, 0 = padding) and position_ids
(0 at each row start). Two changes to the model's forward make a packed sequence compute exactly
what the rows would compute alone:
  - mask: block-diagonal causal, query i may see key j iff j <= i and segment[i] == segment[j];
  - RoPE: each token rotated by ITS position id. mx.fast.rope takes one offset per batch row, so we
    view (B, H, T, D) as (B·T, H, 1, D) and pass the position ids as the offsets. That reuses the
    model's own RoPE module, whatever its variant (plain, Llama-3 scaled, ...).
Supported for the llama-style mlx-lm models (model.model.{embed_tokens, layers, norm}).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from forge_core.errors import ForgeError
from forge_core.models.architectures import ARCHITECTURES, architecture


class Positions:
    """The position ids of the batch being run (a plain object: an nn.Module would treat a dict or an
    array attribute as part of the parameter tree)."""

    value = None


class PositionRoPE(nn.Module):
    """Wraps a RoPE module; when `holder.value` (B, T) is set, rotates token t by positions[b, t]."""

    def __init__(self, inner, holder: Positions):
        super().__init__()
        self.inner = inner
        self.holder = holder

    def __call__(self, x, offset=0):
        pos = self.holder.value
        if pos is None:
            return self.inner(x, offset=offset)
        b, h, t, d = x.shape
        flat = x.transpose(0, 2, 1, 3).reshape(b * t, h, 1, d)  # every token its own "sequence"
        out = self.inner(flat, offset=pos.reshape(-1))
        return out.reshape(b, t, h, d).transpose(0, 2, 1, 3)


def enable_packing(model: nn.Module) -> Positions:
    """Install PositionRoPE in every attention layer; returns the shared holder."""
    if not architecture(getattr(model, "model_type", None)).packing or not hasattr(model, "model"):
        supported = sorted(t for t, a in ARCHITECTURES.items() if a.packing)
        raise ForgeError(f"data.packing: not supported for model type '{getattr(model, 'model_type', '?')}' "
                         f"(supported: {', '.join(supported)}); set data.packing=false")
    holder = getattr(model, "_packing_holder", None)
    if holder is not None:
        return holder
    holder = Positions()
    for block in model.model.layers:
        block.self_attn.rope = PositionRoPE(block.self_attn.rope, holder)
    model._packing_holder = holder
    return holder


def segment_mask(segment_ids: mx.array, dtype) -> mx.array:
    """Additive (B, 1, T, T) mask: 0 where allowed (causal, same segment), -inf-ish elsewhere."""
    t = segment_ids.shape[1]
    causal = mx.arange(t)[:, None] >= mx.arange(t)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (causal[None] & same) | mx.eye(t, dtype=mx.bool_)[None]  # padding attends to itself only
    return mx.where(allowed, 0.0, -1e9).astype(dtype)[:, None]


def packed_hidden(model: nn.Module, inputs: mx.array, segment_ids: mx.array, position_ids: mx.array) -> mx.array:
    """The final-norm hidden states (B, T, D) of a packed batch; `head.logits` turns them into logits."""
    holder = enable_packing(model)
    inner = model.model
    h = inner.embed_tokens(inputs)
    mask = segment_mask(segment_ids, h.dtype)
    holder.value = position_ids
    try:
        for layer in inner.layers:
            h = layer(h, mask, None)
    finally:
        holder.value = None
    return inner.norm(h)
