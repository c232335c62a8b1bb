"""forge_core/losses/grpo.py equals TRL 1.16's GRPOTrainer on identical inputs, to 1e-5, per loss type, on every
array module the backends use; the group advantages equal TRL's formula (its own nanstd)."""

import numpy as np
import pytest

from forge_core.losses.grpo import LOSS_TYPES, group_advantages, grpo_reduce, grpo_terms
from tests.forge_core import trl_harness as trl
from tests.forge_core.test_losses_trl import IDS, MODULES, TOL


def _case(seed=0, n=6, t=9):
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, t))
    for i, k in enumerate(rng.integers(1, t + 1, n)):
        mask[i, :k] = 1.0
    logps = -rng.uniform(0.05, 3.0, (n, t))
    old = logps + rng.normal(0, 0.3, (n, t))  # several iterations per generation: the policy has moved
    ref = logps + rng.normal(0, 0.5, (n, t))
    adv = rng.normal(0, 1, n)
    adv[0] = 0.0  # a group where every completion scored the same
    return logps, old, ref, adv, mask


CASES = [(lt, beta, eps, level, None) for lt in LOSS_TYPES for beta in (0.0, 0.04)
         for eps in ((0.2, 0.2), (0.2, 0.28)) for level in ("token", "sequence")
         if not (level == "sequence" and lt != "grpo")]
CASES += [(lt, 0.04, (0.2, 0.28), "token", 1.3) for lt in LOSS_TYPES]  # two-sided clipping (delta)


@pytest.mark.parametrize("name,xp,to,back", MODULES, ids=IDS)
@pytest.mark.parametrize("loss_type,beta,eps,level,delta", CASES)
def test_grpo_loss_equals_trl(name, xp, to, back, loss_type, beta, eps, level, delta):
    logps, old, ref, adv, mask = _case()
    want, metrics = trl.grpo(logps, old, ref, adv, mask, loss_type, beta, eps[0], eps[1], 9, level, delta)
    per_token, sums = grpo_terms(xp, to(logps), to(old), to(ref), to(adv), to(mask), epsilon_low=eps[0],
                                 epsilon_high=eps[1], beta=beta, level=level, delta=delta)
    total, count = grpo_reduce(xp, per_token, to(mask), loss_type, 9)
    assert float(back(total)) / float(back(count)) == pytest.approx(want, abs=TOL)
    tokens = mask.sum()
    if beta:
        assert float(back(sums["kl"])) / tokens == pytest.approx(metrics["kl"], abs=TOL)
    if level == "token":
        for k in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert float(back(sums[k])) / tokens == pytest.approx(metrics[k], abs=TOL)
    assert metrics["clip_ratio/region_mean"] > 0 or level == "sequence"  # the case does clip


def test_on_policy_first_iteration_is_minus_the_mean_advantage():
    """old = current: the ratio is 1 and the grpo loss is −mean(A) (the gradient is the policy gradient)."""
    logps, _, ref, adv, mask = _case(1)
    per_token, _ = grpo_terms(np, logps, logps, ref, adv, mask)
    total, count = grpo_reduce(np, per_token, mask, "grpo", 9)
    assert total / count == pytest.approx(-adv.mean(), abs=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trls_formula(scale):
    """TRL computes advantages inline in GRPOTrainer._generate_and_score_completions (no callable of its own):
    its lines, with its own nanstd, on the same rewards."""
    torch = pytest.importorskip("torch")
    from trl.trainer.utils import nanstd

    rng = np.random.default_rng(3)
    rewards = rng.normal(0, 1, 12)
    rewards[4:8] = 0.5  # a group with no spread: advantages 0
    rewards[9] = np.nan  # unscorable: left out of its group's mean, advantage 0
    r = torch.tensor(rewards)
    mean = torch.nanmean(r.view(-1, 4), dim=1).repeat_interleave(4)
    std = nanstd(r).expand_as(r) if scale == "batch" else nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    want = r - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0).numpy()
    got = group_advantages(rewards, 4, scale)
    np.testing.assert_allclose(got, want, atol=1e-9)
    assert np.all(got[4:8] == 0) and got[9] == 0
