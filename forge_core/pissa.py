"""PiSSA initialisation, in numpy so both backends get bit-identical factors.

    W (out, in) = U S Vt                          SVD in fp32
    A0 = sqrt(S_r / s) · Vt_r          (r, in)    top-r right singular vectors
    B0 = U_r · sqrt(S_r / s)           (out, r)   top-r left singular vectors
    W_res = W − s · B0 · A0                       what gets quantized (QPiSSA)

with s = alpha / r the LoRA scale, so that W = W_res + s·B0·A0 exactly (up to fp32 rounding) and the
adapted model at step 0 equals the original. This is PEFT's `pissa_init` convention. The randomized
variant (`niter` > 0) is Halko et al.'s subspace iteration, the same idea as torch.svd_lowrank.
"""

from __future__ import annotations

import contextlib

import numpy as np

# Below this many elements a BLAS thread pool costs more than it gives, and on a busy machine
# OpenBLAS's spinning threads made one 1536x576 SVD take 30 s instead of 1.8 s (docs/BENCHMARKS.md).
SINGLE_THREAD_ELEMENTS = 8_000_000


def _blas_threads(w: np.ndarray):
    if w.size >= SINGLE_THREAD_ELEMENTS:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def top_singular(w: np.ndarray, rank: int, niter: int = 0, seed: int = 0):
    """Top-`rank` singular triplets (U_r (out,r), S_r (r,), Vt_r (r,in)) of w, in fp32.

    niter == 0: exact SVD. niter > 0: randomized range finder with `niter` power iterations
    and 2*rank oversampling columns.
    """
    w = np.asarray(w, dtype=np.float32)
    with _blas_threads(w):
        return _top_singular(w, rank, niter, seed)


def _top_singular(w: np.ndarray, rank: int, niter: int, seed: int):
    if niter <= 0:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return u[:, :rank], s[:rank], vt[:rank]
    out_dim, in_dim = w.shape
    k = min(rank * 2 + 8, min(out_dim, in_dim))
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((in_dim, k)).astype(np.float32)
    q, _ = np.linalg.qr(w @ omega)  # (out, k): an orthonormal basis of W's range
    for _ in range(niter):  # power iterations sharpen the spectrum: basis of (W W^T)^i W
        z, _ = np.linalg.qr(w.T @ q)
        q, _ = np.linalg.qr(w @ z)
    ub, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)  # small (k, in) problem
    u = q @ ub
    return u[:, :rank], s[:rank], vt[:rank]


def pissa_factors(w: np.ndarray, rank: int, scale: float, niter: int = 0, seed: int = 0):
    """Returns (A0 (r,in), B0 (out,r), W_res (out,in)), all fp32, with W = W_res + scale·B0·A0."""
    w = np.asarray(w, dtype=np.float32)
    u, s, vt = top_singular(w, rank, niter=niter, seed=seed)
    root = np.sqrt(s / scale).astype(np.float32)
    a0 = (root[:, None] * vt).astype(np.float32)
    b0 = (u * root[None, :]).astype(np.float32)
    w_res = (w - scale * (b0 @ a0)).astype(np.float32)
    return a0, b0, w_res


def residual(w: np.ndarray, a0: np.ndarray, b0: np.ndarray, scale: float) -> np.ndarray:
    """W_res from stored factors: used on resume and export so the SVD never runs twice (signs)."""
    return (np.asarray(w, np.float32) - scale * (b0.astype(np.float32) @ a0.astype(np.float32))).astype(np.float32)
