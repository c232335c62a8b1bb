"""DoRA's weight (Liu et al. 2024), on any array module (numpy, mlx.core, torch): written once for both backends'
LoRA layers and the exports.

    W' = m / ||W + ΔW||_row · (W + ΔW)        m (out,) the trained magnitude, ΔW = s·B·A, W (out, in)
"""

from __future__ import annotations


def nonzero(norm):
    """Row norms with 1 where a row is all zeros (a pruned or zeroed output row): m / norm would be 0/0 = NaN there
    (PEFT's and mlx-lm's DoRA give NaN), while the row's output is 0 whatever the scale. Any array module."""
    return norm + (norm == 0)


def dora_weight(xp, adapted, magnitude):
    """W + ΔW (out, in) -> DoRA's weight; without a magnitude (plain LoRA), W + ΔW as it is."""
    if magnitude is None:
        return adapted
    return adapted * (magnitude / nonzero(xp.sqrt((adapted * adapted).sum(-1))))[:, None]
