"""PiSSA factors (forge_core.pissa): exact reconstruction, the SVD convention, randomized vs full."""

import numpy as np

from forge_core.pissa import pissa_factors, residual, top_singular


def _low_rank_plus_noise(out=96, inp=64, r=6, seed=0):
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((out, r))
    v = rng.standard_normal((r, inp))
    return (u @ v + 0.05 * rng.standard_normal((out, inp))).astype(np.float32)


def test_residual_plus_scaled_factors_reconstructs_w():
    w = _low_rank_plus_noise()
    a0, b0, w_res = pissa_factors(w, rank=8, scale=2.0)
    assert a0.shape == (8, 64) and b0.shape == (96, 8) and w_res.shape == w.shape
    np.testing.assert_allclose(w_res + 2.0 * b0 @ a0, w, atol=1e-5)


def test_factors_carry_the_top_singular_values_split_evenly():
    w = _low_rank_plus_noise()
    scale = 0.5
    a0, b0, _ = pissa_factors(w, rank=4, scale=scale)
    s = np.linalg.svd(w, compute_uv=False)[:4]
    # A0 = sqrt(S/s)·Vt: row norms of A0 and column norms of B0 are both sqrt(S/s)
    np.testing.assert_allclose(np.linalg.norm(a0, axis=1), np.sqrt(s / scale), rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(b0, axis=0), np.sqrt(s / scale), rtol=1e-4)


def test_residual_holds_only_the_tail_of_the_spectrum():
    w = _low_rank_plus_noise(r=6)
    _, _, w_res = pissa_factors(w, rank=6, scale=1.0)
    s_full = np.linalg.svd(w, compute_uv=False)
    s_res = np.linalg.svd(w_res, compute_uv=False)
    np.testing.assert_allclose(s_res[: len(s_full) - 6], s_full[6:], rtol=1e-3, atol=1e-5)


def test_randomized_svd_agrees_with_full_on_top_singular_values():
    w = _low_rank_plus_noise(out=200, inp=120, r=10)
    _, s_full, _ = top_singular(w, 8, niter=0)
    _, s_rand, _ = top_singular(w, 8, niter=4, seed=3)
    np.testing.assert_allclose(s_rand, s_full, rtol=1e-3)


def test_randomized_factors_still_reconstruct_exactly():
    w = _low_rank_plus_noise()
    a0, b0, w_res = pissa_factors(w, rank=8, scale=1.0, niter=2)
    np.testing.assert_allclose(w_res + b0 @ a0, w, atol=1e-5)


def test_residual_from_stored_factors_matches_init():
    w = _low_rank_plus_noise()
    a0, b0, w_res = pissa_factors(w, rank=8, scale=0.25)
    np.testing.assert_array_equal(residual(w, a0, b0, 0.25), w_res)
