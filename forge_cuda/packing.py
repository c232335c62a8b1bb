"""Packed sequences: several rows in one sequence, attention kept within each row, positions reset.

forge_core.data.pack gives segment_ids (which row a token belongs to, 0 = padding) and position_ids
(0 at each row start). transformers models take both as they are, so no model surgery is needed
(forge_mlx has to wrap RoPE; here `position_ids` drive RoPE natively):
  - mask: a custom 4D additive mask (B, 1, T, T), which transformers passes to attention untouched:
    0 where query i may see key j (j <= i and segment[i] == segment[j]), the dtype's minimum elsewhere;
    padding attends to itself only, so no softmax row is fully masked;
  - positions: position_ids (B, T), each token rotated by its position within its own row.
A packed sequence then computes exactly what its rows compute alone. Needs the "sdpa" or "eager"
attention (flash-attention kernels ignore a 4D mask).
"""

from __future__ import annotations

import torch

from forge_core.errors import ForgeError

SUPPORTED_ATTENTION = {"sdpa", "eager"}


def enable_packing(model) -> None:
    """Refuse models whose attention cannot take a 4D mask (nothing to install otherwise)."""
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in SUPPORTED_ATTENTION:
        raise ForgeError(f"data.packing: needs sdpa or eager attention, this model runs '{attn}'; "
                         "set data.packing=false")


def segment_mask(segment_ids: torch.Tensor, dtype) -> torch.Tensor:
    """Additive (B, 1, T, T) mask: 0 where allowed (causal, same segment), dtype-min elsewhere."""
    t = segment_ids.shape[1]
    idx = torch.arange(t, device=segment_ids.device)
    causal = idx[:, None] >= idx[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (causal[None] & same) | torch.eye(t, dtype=torch.bool, device=segment_ids.device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
