"""The learning-rate schedule, once for both backends: a pure function of the update index.

    update k (1-based) runs at lr_at(k - 1):
    warmup   linear from lr/warmup to lr over `warmup` updates (none when warmup is 0)
    then     cosine or linear decay from lr to lr·min_lr_ratio over the remaining updates, or constant
These are mlx.optimizers' cosine_decay / linear_schedule / join_schedules formulas, in Python floats; the
loop hands each step's value to the optimizer, so resume is exact and both backends see the same rates.
"""

from __future__ import annotations

import math


def lr_schedule(train_cfg, steps: int):
    """i (0-based update index) -> learning rate."""
    t = train_cfg
    warmup = min(t.warmup, max(steps - 1, 0))
    end, n = t.lr * t.min_lr_ratio, max(steps - warmup, 1)

    def decay(s: int) -> float:
        s = min(s, n)
        if t.schedule == "cosine":
            return end + 0.5 * (1.0 + math.cos(math.pi / n * s)) * (t.lr - end)
        if t.schedule == "linear":
            return t.lr + (end - t.lr) * s / n
        return t.lr

    def lr_at(i: int) -> float:
        if warmup > 0 and i < warmup:
            start = t.lr / warmup
            return start + (t.lr - start) * i / warmup
        return decay(i - warmup if warmup > 0 else i)

    return lr_at
