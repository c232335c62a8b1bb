"""forge_core/losses equal TRL 1.16's own code (tests/forge_core/trl_harness.py) on identical log-probs, to 1e-5,
on every array module the backends use (numpy, mlx.core, torch), including the edge cases: zero margins
(policy = reference, chosen = rejected log-probs) and label smoothing where the loss has it."""

import numpy as np
import pytest

from forge_core.losses.dpo import LOSS_TYPES as DPO_TYPES
from forge_core.losses.dpo import dpo_objective
from forge_core.losses.kto import kto_means, kto_objective, reference_point
from forge_core.losses.paired import cpo_objective, orpo_objective
from tests.forge_core import trl_harness as trl

TOL = 1e-5


def _modules():
    out = [("numpy", np, lambda a: np.asarray(a, np.float64), np.asarray)]
    try:
        import mlx.core as mx

        import forge_mlx  # noqa: F401  (the BLAS preload before mlx.core)

        out.append(("mlx", mx, lambda a: mx.array(np.asarray(a, np.float32)), lambda a: np.array(a, np.float64)))
    except ImportError:
        pass
    import torch

    out.append(("torch", torch, lambda a: torch.tensor(np.asarray(a, np.float32)),
                lambda a: a.detach().double().numpy()))
    return out


MODULES = _modules()
IDS = [m[0] for m in MODULES]


def _case(edge: str, n: int = 6, seed: int = 0):
    """(policy, reference, ntok) for 2n rows (n chosen then n rejected), sums of per-token log-probs."""
    rng = np.random.default_rng(seed)
    ntok = rng.integers(3, 16, 2 * n).astype(np.float64)
    pol = -ntok * rng.uniform(0.3, 2.5, 2 * n)
    ref = pol + rng.normal(0, 1.5, 2 * n)
    if edge == "policy_is_reference":  # the first step of every reference run: all log-ratios 0
        ref = pol.copy()
    elif edge == "chosen_equals_rejected":  # zero margin from the policy side
        pol[n:], ntok[n:], ref[n:] = pol[:n], ntok[:n], ref[:n]
    return pol, ref, ntok


EDGES = ["random", "policy_is_reference", "chosen_equals_rejected"]


def _dpo_cases():
    for lt in DPO_TYPES:
        smoothing = {"sigmoid": [0.0], "robust": [0.0, 0.2], "exo_pair": [1e-3, 0.1], "aot": [0.0, 0.1],
                     "aot_unpaired": [0.0, 0.1]}.get(lt, [0.0])
        for ls in smoothing:
            for edge in EDGES:
                yield lt, ls, edge


@pytest.mark.parametrize("name,xp,to,back", MODULES, ids=IDS)
@pytest.mark.parametrize("loss_type,ls,edge", list(_dpo_cases()))
def test_dpo_family_equals_trl(name, xp, to, back, loss_type, ls, edge):
    pol, ref, ntok = _case(edge)
    theirs, metrics = trl.dpo(pol, ref, ntok, 0.1, loss_type, ls)
    losses, sums = dpo_objective(xp, to(pol), to(ref), to(ntok), 0.1, loss_type, ls)
    n = len(pol) // 2
    assert abs(float(back(losses).mean()) - theirs) <= TOL * max(1.0, abs(theirs))
    for ours, key in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                      ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies"),
                      ("logps/chosen", "logps/chosen")):
        assert float(back(sums[ours])) / n == pytest.approx(metrics[key], abs=1e-4, rel=1e-5), ours


def test_sigmoid_label_smoothing_is_cdpo():
    """TRL 1.16's sigmoid has no ε; Forge keeps cDPO's (TRL's sigmoid before 1.0, Mitchell 2023): at ε = 0.2 it
    is 0.8 x TRL's sigmoid + 0.2 x TRL's sigmoid on the swapped pair."""
    pol, ref, ntok = _case("random")
    n = len(pol) // 2
    swap = np.r_[n:2 * n, 0:n]
    plain, _ = trl.dpo(pol, ref, ntok, 0.1, "sigmoid")
    swapped, _ = trl.dpo(pol[swap], ref[swap], ntok[swap], 0.1, "sigmoid")
    ours, _ = dpo_objective(np, pol, ref, ntok, 0.1, "sigmoid", 0.2)
    assert ours.mean() == pytest.approx(0.8 * plain + 0.2 * swapped, abs=TOL)


@pytest.mark.parametrize("name,xp,to,back", MODULES, ids=IDS)
@pytest.mark.parametrize("edge", EDGES)
def test_orpo_equals_trl(name, xp, to, back, edge):
    pol, _, ntok = _case(edge)
    n = len(pol) // 2
    avg = pol / ntok
    losses_trl, rc, rr, ratio, log_odds = trl.orpo(avg[:n], avg[n:], 0.25)
    nll = -pol[:n].sum() / ntok[:n].sum()  # what TRL's CrossEntropyLoss gives on these chosen tokens
    ours, sums = orpo_objective(xp, to(pol), to(ntok), 0.25)
    assert float(back(ours).mean()) == pytest.approx(nll - losses_trl.mean(), abs=TOL)
    assert float(back(sums["log_odds_ratio"])) / n == pytest.approx(ratio, abs=TOL)
    assert float(back(sums["log_odds_chosen"])) / n == pytest.approx(log_odds, abs=TOL)
    assert float(back(sums["rewards/chosen"])) / n == pytest.approx(rc.mean(), abs=TOL)
    assert float(back(sums["rewards/margin"])) / n == pytest.approx((rc - rr).mean(), abs=TOL)
    assert float(back(sums["nll_loss"])) / n == pytest.approx(nll, rel=1e-6)


@pytest.mark.parametrize("name,xp,to,back", MODULES, ids=IDS)
@pytest.mark.parametrize("loss_type,ls,alpha", [("sigmoid", 0.0, 1.0), ("sigmoid", 0.1, 1.0), ("hinge", 0.0, 1.0),
                                                ("ipo", 0.0, 0.0), ("simpo", 0.0, 0.0), ("simpo", 0.1, 0.5)])
@pytest.mark.parametrize("edge", EDGES)
def test_cpo_and_simpo_equal_trl(name, xp, to, back, loss_type, ls, alpha, edge):
    pol, _, ntok = _case(edge)
    n = len(pol) // 2
    lp = pol / ntok if loss_type in ("ipo", "simpo") else pol  # TRL's average_log_prob for ipo and simpo
    beta, gamma = (2.0, 1.2) if loss_type == "simpo" else (0.1, 0.0)
    losses_trl, rc, rr = trl.cpo(lp[:n], lp[n:], beta, loss_type, ls, simpo_gamma=gamma)
    nll = -pol[:n].sum() / ntok[:n].sum()
    ours, sums = cpo_objective(xp, to(pol), to(ntok), beta, loss_type, ls, gamma, alpha)
    assert float(back(ours).mean()) == pytest.approx(losses_trl.mean() + alpha * nll, abs=TOL)
    assert float(back(sums["rewards/chosen"])) / n == pytest.approx(rc.mean(), abs=TOL)
    assert float(back(sums["rewards/rejected"])) / n == pytest.approx(rr.mean(), abs=TOL)


@pytest.mark.parametrize("name,xp,to,back", MODULES, ids=IDS)
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("edge", ["random", "policy_is_reference", "kl_clamped"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.7)])
def test_kto_equals_trl(name, xp, to, back, loss_type, edge, weights):
    rng = np.random.default_rng(3)
    pol, ref, ntok = _case("policy_is_reference" if edge == "policy_is_reference" else "random", n=5)
    labels = [True, False, True, True, False, False, True, False, True, True]
    pol_kl = pol - rng.uniform(0, 3, 10)
    ref_kl = pol_kl + (rng.uniform(0.5, 1, 10) if edge == "kl_clamped" else rng.normal(-0.5, 1, 10))
    theirs, metrics = trl.kto(pol, ref, labels, pol_kl, ref_kl, ntok, 0.1, loss_type, *weights)
    z0 = reference_point(np.sum(pol_kl - ref_kl), len(pol_kl)) if loss_type == "kto" else 0.0
    if edge == "kl_clamped":
        assert z0 == 0.0 or loss_type != "kto"  # every mismatched log-ratio < 0: the clamp at 0 is what is tested
    y = np.array(labels, np.float64)
    losses, sums = kto_objective(xp, to(pol), to(ref), to(y), to(np.array([z0])), 0.1, loss_type, *weights)
    assert float(back(losses).mean()) == pytest.approx(theirs, abs=TOL)
    means = kto_means({k: float(back(v)) for k, v in sums.items()}, len(y))
    for key, trl_key in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                         ("rewards/margin", "rewards/margins"), ("logps/chosen", "logps/chosen")):
        assert means[key] == pytest.approx(metrics[trl_key], abs=1e-4), key
    if loss_type == "kto":
        assert means["kl"] == pytest.approx(metrics["kl"], abs=1e-5)
