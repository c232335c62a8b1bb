"""Numerically stable primitives on any array module (numpy, mlx.core, torch): the ones not all three have."""

from __future__ import annotations


def log_sigmoid(xp, x):
    """log σ(x) = −log(1 + e^{−x}) = −logaddexp(0, −x): stable for large |x|."""
    return -xp.logaddexp(x * 0, -x)


def sigmoid(xp, x):
    """σ(x) through log σ (numpy has no sigmoid)."""
    return xp.exp(log_sigmoid(xp, x))


def log1mexp(xp, x):
    """log(1 − e^x) for x < 0, branching at −ln 2 to avoid cancellation (Mächler 2012; TRL's ORPO does the
    same). Both branches are computed, so they are given arguments that are safe on either side."""
    t = -0.6931471805599453
    below = xp.minimum(x, x * 0 + t)  # log1p(−e^x) is accurate here
    above = xp.minimum(xp.maximum(x, x * 0 + t), x * 0 - 1e-30)  # log(−expm1(x)) is accurate here; x < 0
    return xp.where(x < t, xp.log1p(-xp.exp(below)), xp.log(-xp.expm1(above)))


def sort(xp, x):
    """Ascending sort of a 1-D array (torch.sort returns (values, indices))."""
    out = xp.sort(x)
    return out.values if hasattr(out, "values") else out
