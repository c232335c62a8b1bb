"""forge's CPU kernels (cpu_math.py) and the loss-positions head (head.py) compute what MLX computes.

Values and gradients are compared with MLX's own ops (mx.exp, mx.softmax, nn.losses.cross_entropy,
nn.silu, mx.fast.scaled_dot_product_attention) and, end to end, forge's SFT loss and its gradients with
the kernels and positions on vs off.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx import nn
from mlx.utils import tree_flatten

from forge_core.config import ForgeConfig
from forge_core.data import TokenizedRow, add_loss_positions, collate_sft, pack
from forge_mlx import allocator, cpu_math
from forge_mlx.losses import sft_loss
from forge_mlx.model import build_model

pytestmark = pytest.mark.mlx


def _max_abs(a, b) -> float:
    return float(mx.abs(a - b).max().item())


def test_fast_exp_matches_exp_and_underflows_to_zero():
    x = mx.array(np.linspace(-87.0, 88.0, 200_001, dtype=np.float32))
    got, ref = np.array(cpu_math.fast_exp(x), np.float64), np.exp(np.array(x, np.float64))
    mlx_err = np.max(np.abs(np.array(mx.exp(x), np.float64) - ref) / ref)
    assert np.max(np.abs(got - ref) / ref) < max(5e-6, 2 * mlx_err)  # float32 rounding of x·log2(e) dominates
    low = np.array(cpu_math.fast_exp(mx.array([-2e6, cpu_math.MASKED, -100.0, -87.4])))
    assert low[:3].tolist() == [0.0, 0.0, 0.0] and 0 <= low[3] < 1.2e-38  # underflow: 0 (or tiny), never garbage


def test_softmax_logsumexp_nll_values_and_grads_match_mlx():
    mx.random.seed(0)
    x = mx.random.normal((5, 300)) * 8
    g = mx.random.normal(x.shape)
    t = mx.array(np.random.default_rng(0).integers(0, 300, 5).astype(np.int32))
    assert _max_abs(cpu_math.softmax(x), mx.softmax(x, axis=-1)) < 1e-6
    assert _max_abs(mx.grad(lambda v: (cpu_math.softmax(v) * g).sum())(x),
                    mx.grad(lambda v: (mx.softmax(v, axis=-1) * g).sum())(x)) < 1e-5
    assert _max_abs(cpu_math.logsumexp(x), mx.logsumexp(x, axis=-1)) < 1e-5
    ce = lambda v: nn.losses.cross_entropy(v, t, reduction="none")
    assert _max_abs(cpu_math.nll(x, t), ce(x)) < 1e-5
    assert _max_abs(mx.grad(lambda v: cpu_math.nll(v, t).sum())(x), mx.grad(lambda v: ce(v).sum())(x)) < 1e-5


def test_swiglu_value_and_grads_match_silu():
    mx.random.seed(1)
    gate, x = mx.random.normal((4, 96)) * 6, mx.random.normal((4, 96))
    gate = mx.concatenate([gate, mx.array([[-200.0, -90.0, 90.0, 200.0] * 24])])  # saturated both ways
    x = mx.concatenate([x, mx.ones((1, 96))])
    w = mx.random.normal(gate.shape)
    assert _max_abs(cpu_math.swiglu(gate, x), nn.silu(gate) * x) < 1e-5
    ours = mx.grad(lambda a, b: (cpu_math.swiglu(a, b) * w).sum(), argnums=(0, 1))(gate, x)
    ref = mx.grad(lambda a, b: (nn.silu(a) * b * w).sum(), argnums=(0, 1))(gate, x)
    assert max(_max_abs(p, q) for p, q in zip(ours, ref)) < 1e-5


@pytest.mark.parametrize("mask", ["none", "causal", "additive", "bool4d", "causal_offset", "per_head",
                                  "causal_chunked"])
def test_attention_matches_sdpa_with_grouped_heads(mask):
    mx.random.seed(2)
    t = cpu_math.CHUNK * 2 + 5 if mask == "causal_chunked" else 10  # 3 query blocks, the last one short
    q, k, v = mx.random.normal((2, 6, t, 8)), mx.random.normal((2, 2, t, 8)), mx.random.normal((2, 2, t, 8))
    m = {"none": None, "causal": "causal", "causal_offset": "causal", "causal_chunked": "causal",
         "additive": mx.random.normal((10, 10)),
         "bool4d": (mx.random.uniform(shape=(2, 1, 10, 10)) > 0.4) | mx.eye(10, dtype=mx.bool_),
         "per_head": mx.random.normal((2, 6, 10, 10))}[mask]
    if mask == "causal_offset":
        q = q[:, :, -3:]  # 3 new queries after 7 cached keys
    ours = lambda a, b, c: cpu_math.attention(a, b, c, 0.3, m)
    ref = lambda a, b, c: mx.fast.scaled_dot_product_attention(a, b, c, scale=0.3, mask=m)
    assert _max_abs(ours(q, k, v), ref(q, k, v)) < 1e-5
    go = mx.grad(lambda *a: (ours(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    gr = mx.grad(lambda *a: (ref(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    assert max(_max_abs(p, r) / max(1.0, mx.abs(r).max().item()) for p, r in zip(go, gr)) < 1e-5


def test_add_loss_positions_indexes_weighted_tokens_in_few_shapes():
    mask = np.zeros((2, 16), np.float32)
    mask[0, 3:7], mask[1, 10:13] = 1.0, 0.5
    b = add_loss_positions({"mask": mask}, buckets=8)
    n = len(b["loss_positions"])
    assert n % 4 == 0 and n >= 7  # padded to a multiple of B*T/8 = 4
    real = b["loss_weights"] > 0
    assert b["loss_positions"][real].tolist() == [3, 4, 5, 6, 26, 27, 28]
    assert b["loss_weights"][real].tolist() == [1, 1, 1, 1, 0.5, 0.5, 0.5]
    assert b["loss_weights"][~real].sum() == 0
    capped = add_loss_positions({"mask": mask}, row_cap=5)  # a dataset whose rows train at most 5 tokens
    assert len(capped["loss_positions"]) == 10 and capped["loss_positions"][:7].tolist() == [3, 4, 5, 6, 26, 27, 28]


def test_loss_row_cap_is_the_most_trained_tokens_of_a_row():
    from forge_core.data import PreferenceRow, loss_row_cap

    rows = [TokenizedRow(tokens=np.arange(6, dtype=np.int32), mask=np.array([1, 1, 0, 1, 1, 1], bool)),
            TokenizedRow(tokens=np.arange(4, dtype=np.int32), mask=np.array([0, 1, 1, 1], bool))]
    assert loss_row_cap(rows) == 4  # targets are tokens[1:]: the first row trains 4 of its 5
    pairs = [PreferenceRow(prompt=np.arange(9, dtype=np.int32), chosen=np.arange(3, dtype=np.int32),
                           rejected=np.arange(7, dtype=np.int32))]
    assert loss_row_cap(pairs) == 7  # the longer completion


def _tiny(tiny_model):
    cfg = ForgeConfig()
    cfg.model.path, cfg.quant.bits, cfg.lora.init = str(tiny_model), 0, "lora"
    mx.random.seed(0)
    model, _, _, _ = build_model(cfg)
    for layer in model.model.layers:  # B = 0 at init: give the adapters a value so their gradients differ
        for _, m in layer.named_modules():
            if hasattr(m, "lora_b"):
                m.lora_b = mx.random.normal(m.lora_b.shape) * 0.05
    return model


def _batch(packed: bool):
    rng = np.random.default_rng(3)
    rows = []
    for n in (9, 14, 6, 11):
        ids = rng.integers(0, 256, n).astype(np.int32)
        mask = np.zeros(n, bool)
        mask[n // 2:] = True  # the second half is the "assistant" part
        rows.append(TokenizedRow(tokens=ids, mask=mask))
    rows = pack(rows, max_seq_len=24) if packed else rows
    return add_loss_positions(collate_sft(rows, pad_id=256, pad_multiple=8))


@pytest.mark.parametrize("packed", [False, True])
def test_sft_loss_and_grads_equal_with_fast_math_and_loss_positions(tiny_model, packed):
    model = _tiny(tiny_model)
    full = _batch(packed)
    plain = {k: mx.array(v) for k, v in full.items() if not k.startswith("loss_")}
    fast = {k: mx.array(v) for k, v in full.items()}
    grad = nn.value_and_grad(model, lambda m, b: sft_loss(m, b)[0])
    try:
        cpu_math.install(model, False)
        l0, g0 = grad(model, plain)
        cpu_math.install(model, True)
        l1, g1 = grad(model, fast)
    finally:
        cpu_math.install(model, True)
    assert abs(l0.item() - l1.item()) < 1e-4 * abs(l0.item())
    g0, g1 = dict(tree_flatten(g0)), dict(tree_flatten(g1))
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), atol=2e-5, rtol=1e-4, err_msg=k)


def test_install_routes_the_model_module_and_logits_agree(tiny_model):
    import sys

    model = _tiny(tiny_model)
    module = sys.modules[type(model).__module__]
    x = mx.array([[257, 84, 82, 68, 81, 198, 71, 64]])
    try:
        assert set(cpu_math.install(model, True)) == {"scaled_dot_product_attention", "swiglu"}
        assert hasattr(module.scaled_dot_product_attention, "forge_original")
        fast = model(x)
        assert cpu_math.install(model, False) == []
        plain = model(x)
    finally:
        cpu_math.install(model, True)
    assert _max_abs(fast, plain) < 1e-5


def test_malloc_tuning_is_applied_on_linux_glibc():
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert allocator.keep_freed_memory() is True


def test_sequence_logps_with_loss_positions_equal_the_full_head(tiny_model):
    from forge_core.data import PreferenceRow, collate_dpo
    from forge_mlx.losses import sequence_logps

    model = _tiny(tiny_model)
    rng = np.random.default_rng(4)
    ids = lambda n: rng.integers(0, 256, n).astype(np.int32)
    rows = [PreferenceRow(prompt=ids(7), chosen=ids(5), rejected=ids(9)),
            PreferenceRow(prompt=ids(12), chosen=ids(3), rejected=ids(4))]
    full = add_loss_positions(collate_dpo(rows, pad_id=256))
    plain = {k: mx.array(v) for k, v in full.items() if not k.startswith("loss_")}
    fast = {k: mx.array(v) for k, v in full.items()}
    ref, got = np.array(sequence_logps(model, plain)), np.array(sequence_logps(model, fast))
    assert ref.shape == (4,) and np.all(ref < 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)
    w = mx.array([1.0, -2.0, 0.5, 3.0])  # a DPO-like signed combination of the four rows
    grad = nn.value_and_grad(model, lambda m, b: (sequence_logps(m, b) * w).sum())
    g0, g1 = dict(tree_flatten(grad(model, plain)[1])), dict(tree_flatten(grad(model, fast)[1]))
    for k in g0:
        np.testing.assert_allclose(np.array(g1[k]), np.array(g0[k]), atol=2e-5, rtol=1e-4, err_msg=k)
