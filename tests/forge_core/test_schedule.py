"""forge_core.schedule: the learning rate of every update, as both backends' optimizers receive it."""

import pytest

from forge_core.config import ForgeConfig
from forge_core.schedule import lr_schedule


def _train(**kw):
    t = ForgeConfig().train
    for k, v in kw.items():
        setattr(t, k, v)
    return t


def test_warmup_then_cosine_to_min_ratio():
    lr = lr_schedule(_train(lr=1.0, warmup=4, min_lr_ratio=0.1, schedule="cosine"), 14)
    assert [lr(i) for i in range(5)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])
    assert lr(4 + 5) == pytest.approx(0.55)  # half way through the cosine: (1 + 0.1) / 2
    assert lr(14) == pytest.approx(0.1) and lr(100) == pytest.approx(0.1)


def test_linear_and_constant_schedules_without_warmup():
    linear = lr_schedule(_train(lr=2.0, warmup=0, min_lr_ratio=0.0, schedule="linear"), 4)
    assert [linear(i) for i in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    constant = lr_schedule(_train(lr=3e-4, warmup=0, schedule="constant"), 10)
    assert {constant(i) for i in range(12)} == {3e-4}


def test_warmup_is_capped_below_the_run_length():
    # 3 steps with warmup 10: warmup becomes 2, so the last update still runs at the full rate
    lr = lr_schedule(_train(lr=1.0, warmup=10, min_lr_ratio=1.0, schedule="cosine"), 3)
    assert [lr(i) for i in range(3)] == pytest.approx([0.5, 0.75, 1.0])


def test_matches_mlx_optimizers_schedules():
    optim = pytest.importorskip("mlx.optimizers")
    t = _train(lr=1e-3, warmup=3, min_lr_ratio=0.1, schedule="cosine")
    ours = lr_schedule(t, 20)
    warm = optim.linear_schedule(t.lr / 3, t.lr, 3)
    theirs = optim.join_schedules([warm, optim.cosine_decay(t.lr, 17, t.lr * 0.1)], [3])
    for i in range(25):
        assert ours(i) == pytest.approx(theirs(i).item(), rel=1e-6)
