"""forge_mlx == forge_cuda on the same tiny model and the same adapter weights (tools/parity.py, fp32, no quant)."""

import pytest

pytest.importorskip("mlx")
pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

import forge_mlx  # noqa: F401  (first: its BLAS preload must precede mlx.core)
from tools import parity

pytestmark = [pytest.mark.mlx, pytest.mark.cuda]


@pytest.fixture
def adapted(tiny_model):
    """Both backends' models with the same random LoRA factors (B != 0) on the same base."""
    cfg = parity.config(tiny_model)
    _, probe, _, _ = parity.build_both(cfg)
    mlx_model, cuda_model, _, _ = parity.build_both(cfg, parity.random_adapter(probe))
    return cfg, mlx_model, cuda_model


def test_same_weights_give_the_same_logits(adapted, tiny_model):
    cfg, mlx_model, cuda_model = adapted
    ids = parity.tokens(cuda_model.config.vocab_size)
    assert parity.logits_diff(mlx_model, cuda_model, ids) <= 1e-4
    base_mlx, _, _, _ = parity.build_both(cfg)  # the factors matter: not a comparison of two base models
    assert parity.logits_diff(base_mlx, cuda_model, ids) > 1e-2


def test_same_sft_and_dpo_loss_on_the_same_batch(adapted):
    _, mlx_model, cuda_model = adapted
    d = parity.loss_diffs(mlx_model, cuda_model, cuda_model.config.vocab_size)
    assert d["sft"] <= 1e-4 and d["dpo"] <= 1e-4
    assert d["sft_loss"] > 1.0 and d["dpo_loss"] > 0.0


def test_same_pissa_factors_from_the_full_svd(tiny_model):
    _, _, mlx_factors, cuda_factors = parity.build_both(parity.config(tiny_model, init="pissa"))
    assert len(cuda_factors) == 14 and parity.pissa_diff(mlx_factors, cuda_factors) == 0.0


def test_same_learning_rate_schedule(tiny_model):
    cfg = parity.config(tiny_model)
    cfg.train.warmup, cfg.train.lr = 5, 1e-3
    assert parity.schedule_diff(cfg) <= 1e-6


def test_an_mlx_adapter_loads_on_torch_as_the_same_model(adapted, tmp_path):
    cfg, mlx_model, _ = adapted
    assert parity.adapter_diff(cfg, mlx_model, tmp_path / "adapter") <= 1e-4
