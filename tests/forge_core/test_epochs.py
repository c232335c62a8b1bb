"""train.epochs -> steps: an epoch is the data order's full micro-batches, so a run of train.epochs ends at that
epoch (as logged), not one batch into the next."""

import math
from types import SimpleNamespace

import pytest

from forge_core.data.batches import BatchOrder
from forge_core.rundir import total_steps


def _cfg(batch_size, grad_accum=1, epochs=1.0):
    return SimpleNamespace(steps=0, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum)


@pytest.mark.parametrize("n_rows,batch,accum,world,epochs", [
    (6, 4, 1, 1, 1.0),  # the README walk's 6-row run: 1 step (it logged epoch 1.67 at 2 steps)
    (6, 2, 1, 1, 1.0), (6, 2, 2, 1, 1.0), (7, 2, 1, 1, 2.0), (24, 4, 2, 2, 1.5), (3, 8, 1, 1, 1.0), (10, 3, 1, 1, 0.5)])
def test_a_run_of_n_epochs_ends_at_n_epochs(n_rows, batch, accum, world, epochs):
    steps = total_steps(_cfg(batch, accum, epochs), n_rows, world)
    order = BatchOrder(n_rows, batch * world, seed=0)
    per_epoch = max(1, n_rows // (batch * world))  # the micro-batches of one epoch
    for _ in range(steps * accum):
        order.next_batch()
    assert order.epoch >= epochs - 1e-9  # every epoch asked for is trained
    # and less than one more step beyond it (a step's micro-batches may straddle an epoch's end)
    assert order.epoch < epochs + accum / per_epoch + 1e-9
    assert steps == max(1, math.ceil(epochs * per_epoch / accum))


def test_steps_wins_over_epochs():
    cfg = _cfg(4)
    cfg.steps = 7
    assert total_steps(cfg, 100) == 7
