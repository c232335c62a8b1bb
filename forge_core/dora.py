"""DoRA's weight (Liu et al. 2024), on any array module (numpy, mlx.core, torch): written once for both backends'
LoRA layers and the exports.

    W' = m / ||W + ΔW||_row · (W + ΔW)        m (out,) the trained magnitude, ΔW = s·B·A, W (out, in)
"""

from __future__ import annotations


def dora_weight(xp, adapted, magnitude):
    """W + ΔW (out, in) -> DoRA's weight; without a magnitude (plain LoRA), W + ΔW as it is."""
    if magnitude is None:
        return adapted
    return adapted * (magnitude / xp.sqrt((adapted * adapted).sum(-1)))[:, None]
