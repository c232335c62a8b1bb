"""dpo_objective: IPO on per-token means, the RPO-style SFT term on chosen, metric sums."""

import numpy as np

from forge_core.preference import dpo_objective, dpo_terms


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
