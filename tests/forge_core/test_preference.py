"""The DPO family on numpy: TRL's formulas, IPO on per-token means, the RPO-style SFT term on chosen,
metric sums, and forge_core's dpo_loss pairing one concatenated batch (no framework needed)."""

import types

import numpy as np
import pytest

from forge_core.losses.dpo import dpo_objective, dpo_terms
from forge_core.objectives.dpo import dpo_loss


def numpy_trl(pc, pr, rc, rr, beta, loss_type, ls=0.0):
    """TRL's DPOTrainer.dpo_loss written out independently in numpy."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        sig = lambda z: 1 / (1 + np.exp(-z))
        return -np.log(sig(beta * logits)) * (1 - ls) - np.log(sig(-beta * logits)) * ls
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    return np.maximum(0, 1 - beta * logits)


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_terms_equal_trl_formulas(loss_type, ls):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 5, 16) for _ in range(4))
    ours, rw_c, rw_r = dpo_terms(np, pc, pr, rc, rr, 0.1, loss_type, ls)
    np.testing.assert_allclose(ours, numpy_trl(pc, pr, rc, rr, 0.1, loss_type, ls), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rw_c, 0.1 * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(rw_r, 0.1 * (pr - rr), rtol=1e-6)


def test_sigmoid_loss_at_equal_policy_and_reference_is_log_2():
    x = np.array([-7.0, -3.0])
    losses, rw_c, rw_r = dpo_terms(np, x, x[::-1], x, x[::-1], 0.1)
    np.testing.assert_allclose(losses, [np.log(2), np.log(2)], rtol=1e-12)
    np.testing.assert_allclose(rw_c, [0.0, 0.0])


def test_dpo_terms_match_torch_logsigmoid_when_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (rng.normal(-30, 8, 8) for _ in range(4))
    logits = torch.tensor((pc - pr) - (rc - rr))
    ref = -torch.nn.functional.logsigmoid(0.1 * logits).numpy()
    ours, _, _ = dpo_terms(np, pc, pr, rc, rr, 0.1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_dpo_loss_pairs_chosen_first_and_sums_over_pairs():
    """One concatenated batch: rows [0, B) chosen, [B, 2B) rejected; the loss is the SUM of per-pair losses."""
    per_row = np.array([-2.0, -1.0, -3.0, -2.5])  # the policy's sequence log-probs, chosen 0,1 | rejected 2,3
    ops = types.SimpleNamespace(xp=np, sequence_logps=lambda model, batch: per_row,
                                scalar=lambda value, like: np.float32(value))
    batch = {"mask": np.ones((4, 3), np.float32), "ref_logps": np.array([-2.5, -1.0, -2.0, -2.5])}
    loss, pairs, metrics = dpo_loss(ops, None, batch, beta=0.5)
    # h = (pol_c - ref_c) - (pol_r - ref_r): pair 0: 0.5 - (-1.0) = 1.5; pair 1: 0 - 0 = 0
    expected = -np.log(1 / (1 + np.exp(-0.5 * 1.5))) - np.log(0.5)
    assert pairs == 2
    np.testing.assert_allclose(loss, expected, rtol=1e-12)
    np.testing.assert_allclose(metrics["rewards/chosen"], 0.5 * 0.5 + 0.0)
    np.testing.assert_allclose(metrics["rewards/rejected"], 0.5 * -1.0 + 0.0)
    assert metrics["rewards/accuracy"] == 1.0  # pair 0: 0.25 > -0.5; pair 1: 0 == 0 does not count


def test_sft_term_is_per_token_nll_of_chosen_even_under_ipo():
    logps = np.array([-10.0, -8.0, -12.0, -9.0])  # chosen 0,1 | rejected 2,3 (sums)
    ref = np.array([-11.0, -8.5, -11.0, -9.5])
    ntok = np.array([5.0, 4.0, 6.0, 3.0])
    base, _ = dpo_objective(np, logps, ref, ntok, 0.1, "ipo")
    with_sft, _ = dpo_objective(np, logps, ref, ntok, 0.1, "ipo", sft_weight=0.5)
    np.testing.assert_allclose(with_sft - base, 0.5 * np.array([10 / 5, 8 / 4]))
    expected, _, _ = dpo_terms(np, logps[:2] / ntok[:2], logps[2:] / ntok[2:], ref[:2] / ntok[:2], ref[2:] / ntok[2:],
                               0.1, "ipo")
    np.testing.assert_allclose(base, expected)


def test_metric_sums():
    logps = np.array([-1.0, -2.0, -3.0, -1.0])
    ref = np.zeros(4)
    _, m = dpo_objective(np, logps, ref, np.ones(4), 1.0)
    assert m["rewards/accuracy"] == 1.0  # pair 0: -1 > -3 ; pair 1: -2 < -1
    np.testing.assert_allclose(m["rewards/margin"], (-1 - -3) + (-2 - -1))
    np.testing.assert_allclose(m["logps/chosen"], -3.0)
