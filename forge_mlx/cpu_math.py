"""exp-based kernels for MLX's CPU backend: softmax (attention), SwiGLU and the loss's log-sum-exp.

Why: on the x86-64 Linux MLX wheel, `mx.exp` costs ~16 ns per element, and so does everything built
on it: sigmoid/SiLU, softmax, logsumexp, cross-entropy and the CPU fallback of
scaled_dot_product_attention. In a training step of SmolLM2-135M that was more than the matmuls' share.
MLX's own exp is a good polynomial; our best guess at the cost is its fused multiply-adds, which an
x86 build without FMA code generation turns into library calls. Written here with separate
multiplies and adds and integer ops for 2**n (no clip/where/maximum, also slow on this backend)
inside a compiled graph, the same polynomial runs several times faster at the same accuracy
(docs/BENCHMARKS.md, "MLX CPU kernels").

Each kernel is an mx.custom_function whose backward needs no exp at all (softmax: p·(g - Σg·p)) or
only the fast one. Attention stacks the query heads that share a KV head (one matmul per KV head)
and, causal, runs in blocks of CHUNK queries that skip the masked upper triangle. `install(model)`
routes the model's mlx-lm module functions `scaled_dot_product_attention` and `swiglu` here while
the default device is the CPU; on Metal/CUDA, and for what these kernels do not cover (attention
sinks, quantized KV caches), the dispatchers call mlx-lm's originals. Values and gradients match
MLX's to ~1e-6 (tests/forge_mlx/test_cpu_math.py).
"""

from __future__ import annotations

import sys

import mlx.core as mx

LOG2E = 1.4426950408889634
ROUND = 12582912.0  # 1.5 * 2**23: x + ROUND - ROUND rounds x to the nearest integer (|x| < 2**22)
CHUNK = 64  # causal self-attention runs in query blocks of this size (measured best of 32/64/128)
MASKED = -30000.0  # the score of a masked key: exp() of it is 0, and it is finite in float16 too

_state = {"enabled": True}


def _fast_exp(x: mx.array) -> mx.array:
    """exp(x) for finite x in (-2.9e6, 88] (callers pass x <= 0; masks use MASKED, never -inf).

    2**n · 2**f with n = round(x·log2 e), f in [-1/2, 1/2]: a degree-6 polynomial for 2**f, and
    2**n built as the float32 bit pattern (n + 127) << 23, where n + 127 < 0 (underflow) becomes 0,
    i.e. exp(x) = 0 below about -87.3. Only multiplies, adds and integer ops: no clip, maximum, where
    or comparison, which each cost several ns per element on this backend.
    """
    y = x.astype(mx.float32) * LOG2E
    r = y + ROUND  # n sits in the low mantissa bits of r
    f = y - (r - ROUND)
    p = 1.535336188319500e-4
    p = p * f + 1.339887440266574e-3
    p = p * f + 9.618437357674640e-3
    p = p * f + 5.550332471162809e-2
    p = p * f + 2.402264791363012e-1
    p = p * f + 6.931472028550421e-1
    p = p * f + 1.0
    k = mx.view(r, mx.int32) - (0x4B400000 - 127)  # n + 127, the biased exponent
    k = k & ~(k >> 31)  # negative -> 0: 2**n is 0.0
    return (p * mx.view(k << 23, mx.float32)).astype(x.dtype)


fast_exp = mx.compile(_fast_exp)  # not shapeless: mx.view cannot infer shapes


@mx.custom_function
def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, computed in float32."""
    x32 = x.astype(mx.float32)
    e = fast_exp(x32 - mx.stop_gradient(x32.max(axis=-1, keepdims=True)))
    return (e * (1.0 / e.sum(axis=-1, keepdims=True))).astype(x.dtype)  # one division per row


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    p = output
    return (p * (cotangent - (cotangent * p).sum(axis=-1, keepdims=True)),)


@mx.custom_function
def logsumexp(x: mx.array) -> mx.array:
    """log Σ exp(x) over the last axis (float32); its gradient is softmax(x)."""
    x32 = x.astype(mx.float32)
    m = mx.stop_gradient(x32.max(axis=-1, keepdims=True))
    return (m + mx.log(fast_exp(x32 - m).sum(axis=-1, keepdims=True))).squeeze(-1)


@logsumexp.vjp
def _logsumexp_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals  # one input: MLX passes the array
    p = fast_exp(x.astype(mx.float32) - output[..., None])
    return ((cotangent[..., None] * p).astype(x.dtype),)


def nll(logits: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(logits)[target] per row: logits (..., V), targets (...) -> (...), float32."""
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1).squeeze(-1)
    return logsumexp(logits) - picked.astype(mx.float32)


def _sigmoid(x):
    """1 / (1 + exp(-x)) through exp(-|x|) <= 1, so fast_exp never sees a large argument."""
    e = fast_exp(-mx.abs(x))
    s = 1.0 / (1.0 + e)  # sigmoid(|x|)
    pos = x >= 0
    return pos * s + (1 - pos) * (1.0 - s)  # sigmoid(-|x|) = 1 - sigmoid(|x|)


@mx.custom_function
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) · x, the SwiGLU MLP's activation."""
    return gate * _sigmoid(gate) * x


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals
    s = _sigmoid(gate)
    silu = gate * s
    return cotangent * x * (s + silu * (1.0 - s)), cotangent * silu


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q·kᵀ·scale + mask)·v with grouped KV heads: q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D).

    mask: None, "causal" (query i of the last Tq sees keys up to Tk - Tq + i), a boolean array
    (True = attend) or an additive array, broadcastable to (B, Hq, Tq, Tk).
    The query heads sharing a KV head are stacked as rows, (B, Hkv, group·Tq, D): one matmul per KV
    head instead of one per query head (small matmuls cost mostly call overhead on the CPU), and no
    broadcast whose gradient would need a sum over the group.
    """
    b, hq, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    group = hq // hk
    if isinstance(mask, str) and mask == "causal" and tq == tk > CHUNK:
        return _causal_by_chunks(q, k, v, scale)
    q = (q * scale).reshape(b, hk, group * tq, d)
    scores = q @ k.swapaxes(-1, -2)  # (B, Hkv, group·Tq, Tk)
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"attention mask '{mask}' is not supported")
        allowed = mx.arange(tq)[:, None] + (tk - tq) >= mx.arange(tk)[None]
        scores = scores + mx.tile(mx.where(allowed, 0.0, MASKED), (group, 1)).astype(scores.dtype)
    elif mask is not None:  # made additive and finite on the (small) mask, then one add on the scores
        m = mx.where(mask, 0.0, MASKED) if mask.dtype == mx.bool_ else mx.maximum(mask, MASKED)
        scores = scores + _stacked(m, hk, group).astype(scores.dtype)
    out = softmax(scores) @ v  # (B, Hkv, group·Tq, D)
    return out.reshape(b, hq, tq, d)


def _causal_by_chunks(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal self-attention one block of CHUNK queries at a time, each against the keys up to its
    end only: the blocks above the diagonal, which the mask would zero, are never computed (T=512:
    56% of the scores; forward + backward 1.7x faster than the full square, docs/BENCHMARKS.md)."""
    b, hq, t, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    q = (q * scale).reshape(b, hk, group, t, d)
    outs = []
    for s in range(0, t, CHUNK):
        e = min(s + CHUNK, t)
        scores = q[:, :, :, s:e].reshape(b, hk, group * (e - s), d) @ k[:, :, :e].swapaxes(-1, -2)
        allowed = mx.arange(s, e)[:, None] >= mx.arange(e)[None]
        scores = scores + mx.tile(mx.where(allowed, 0.0, MASKED), (group, 1)).astype(scores.dtype)
        outs.append((softmax(scores) @ v[:, :, :e]).reshape(b, hk, group, e - s, d))
    return mx.concatenate(outs, axis=3).reshape(b, hq, t, d)


def _stacked(mask: mx.array, hk: int, group: int) -> mx.array:
    """A mask broadcastable to (B, Hq, Tq, Tk) laid out like the stacked scores (B, Hkv, group·Tq, Tk)."""
    if mask.ndim == 4 and mask.shape[1] == hk * group and group > 1:
        return mask.reshape(mask.shape[0], hk, group * mask.shape[2], mask.shape[3])
    reps = (1,) * (mask.ndim - 2) + (group, 1)
    return mx.tile(mask, reps)  # (.., Tq, Tk) -> (.., group·Tq, Tk): every head of the group sees it


# ---------------------------------------------------------------- routing mlx-lm's model code here

def active() -> bool:
    """Whether forge's kernels are in use now (enabled, and the default device is the CPU)."""
    return _state["enabled"] and mx.default_device() == mx.cpu


def _sdpa_dispatch(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None, **kwargs):
        if not active() or sinks is not None or kwargs or hasattr(cache, "bits"):
            return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks, **kwargs)
        return attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention.forge_original = original
    return scaled_dot_product_attention


def _swiglu_dispatch(original):
    def dispatched(gate, x):
        return swiglu(gate, x) if active() else original(gate, x)

    dispatched.forge_original = original
    return dispatched


_DISPATCHERS = {"scaled_dot_product_attention": _sdpa_dispatch, "swiglu": _swiglu_dispatch}


def install(model, enabled: bool = True) -> list[str]:
    """Route the model's mlx-lm module functions through these kernels (CPU only, see the module doc).

    Patches the functions in the model class's module (e.g. mlx_lm.models.llama), so it applies to
    every model of that architecture in this process; `enabled=False` turns the routing off again.
    Returns the names routed.
    """
    _state["enabled"] = enabled
    module = sys.modules.get(type(model).__module__)
    routed = []
    for name, make in _DISPATCHERS.items():
        current = getattr(module, name, None)
        if current is None:
            continue
        if not hasattr(current, "forge_original"):
            setattr(module, name, make(current))
        routed.append(name)
    return routed if enabled else []
