"""The chunked loss head (forge_mlx/head.py chunked_nll): the same values and gradients as the full logits, a few
positions at a time, and a training run that gives the same losses either way."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from forge_mlx import cpu_math, head
from tests.forge_mlx.run import train
from tests.forge_mlx.test_trainer import _cfg, _losses, _rows

pytestmark = pytest.mark.mlx


@pytest.fixture
def small_chunks(monkeypatch):
    """8 positions per chunk, so a few dozen positions run as several chunks (the real size is ~4 MiB of logits)."""
    monkeypatch.setattr(head, "head_chunk_rows", lambda vocab: 8)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.7])
def test_chunked_nll_equals_the_full_logits_in_value_and_gradient(small_chunks, fast, scale):
    before = cpu_math._state["enabled"]
    cpu_math._state["enabled"] = fast  # forge's exp kernels or MLX's own
    try:
        mx.random.seed(3)
        n, d, v = 37, 24, 300  # 37 positions: four chunks of 8 and one of 5
        h, w = mx.random.normal((n, d)), mx.random.normal((v, d)) * 0.3
        t, g = mx.random.randint(0, v, (n,)), mx.random.normal((n,))

        def full(h, w):
            return (head.token_nll((h @ w.T).astype(mx.float32) * scale, t) * g).sum()

        def chunked(h, w):
            return (head.chunked_nll(h, w, t, mx.array(scale)) * g).sum()

        (a, (dh_a, dw_a)), (b, (dh_b, dw_b)) = (mx.value_and_grad(f, argnums=(0, 1))(h, w) for f in (full, chunked))
        np.testing.assert_allclose(b.item(), a.item(), rtol=1e-6)
        np.testing.assert_allclose(np.array(dh_b), np.array(dh_a), atol=1e-6)
        np.testing.assert_allclose(np.array(dw_b), np.array(dw_a), atol=1e-5)
        per_row = head.chunked_nll(h, w, t, mx.array(scale))
        np.testing.assert_allclose(np.array(per_row), np.array(head.token_nll((h @ w.T) * scale, t)), atol=1e-5)
    finally:
        cpu_math._state["enabled"] = before


def test_training_with_the_chunked_head_gives_the_full_heads_losses(small_chunks, tiny_model, jsonl, tmp_path,
                                                                    monkeypatch):
    calls = []
    real = head.chunked_nll
    monkeypatch.setattr(head, "chunked_nll", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    data = jsonl("train.jsonl", _rows())
    chunked = train(_cfg(tiny_model, data, tmp_path / "chunked", steps=3))
    assert calls and max(calls) > 8  # traced with more positions than one chunk holds
    calls.clear()
    full = train(_cfg(tiny_model, data, tmp_path / "full", steps=3, chunked_loss=False))
    assert not calls
    np.testing.assert_allclose(_losses(chunked), _losses(full), atol=1e-5)


def test_the_model_carries_the_setting_and_the_plain_path_serves_quantized_heads(tiny_model):
    from forge_core.config import ForgeConfig
    from forge_mlx.model import build_model

    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.quant.group_size, cfg.train.chunked_loss = str(tiny_model), 4, 32, False
    model = build_model(cfg)[0]
    assert model.forge_chunked_loss is False
    assert head.dense_head_weight(model) is not None  # the tiny model's lm_head: a plain bias-free Linear
    cfg.quant.embeddings = True
    assert head.dense_head_weight(build_model(cfg)[0]) is None  # quantized: the full-logits path
