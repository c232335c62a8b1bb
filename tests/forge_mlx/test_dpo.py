"""DPO on MLX: the loss equals TRL's formulas, the reference is the policy at init, training separates pairs."""

import json
import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from forge_core.config import ForgeConfig
from forge_core.losses.dpo import dpo_terms
from forge_core.objectives.dpo import dpo_loss
from forge_mlx import ops
from tests.forge_core.test_preference import numpy_trl
from tests.forge_mlx.run import train

pytestmark = pytest.mark.mlx


def test_dpo_terms_on_mlx_equal_numpy():
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-40, 5, 16) for _ in range(4))
    for loss_type, ls in [("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]:
        ours, _, _ = dpo_terms(np, pc, pr, rc, rr, 0.1, loss_type, ls)
        mlx_losses, _, _ = dpo_terms(mx, *(mx.array(a) for a in (pc, pr, rc, rr)), 0.1, loss_type, ls)
        np.testing.assert_allclose(np.array(mlx_losses), ours, rtol=1e-5, atol=1e-5)


def test_dpo_loss_uses_one_concatenated_forward_chosen_first():
    """With a fake model the per-sequence log-probs are known; check pairing and the sum."""
    class Fake:
        def __call__(self, inputs):  # uniform logits over 4 tokens -> log p = -log 4 per token
            return mx.zeros((*inputs.shape, 4))

    mask = mx.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0]], dtype=mx.float32)  # 2 pairs
    batch = {"inputs": mx.zeros((4, 3), dtype=mx.int32), "targets": mx.zeros((4, 3), dtype=mx.int32),
             "mask": mask, "ref_logps": mx.zeros((4,))}
    loss, n, metrics = dpo_loss(ops, Fake(), batch, beta=0.5)
    logp = -np.log(4) * np.array([2, 1, 3, 2])  # chosen rows 0,1; rejected rows 2,3
    expected = numpy_trl(logp[:2], logp[2:], 0, 0, 0.5, "sigmoid").sum()
    assert n.item() == 2
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/chosen"].item(), 0.5 * logp[:2].sum(), rtol=1e-5)


def _pairs(n=16):
    rows = []
    for i in range(n):
        good, bad = ("yes " * (1 + i % 3)).strip(), ("no " * (1 + i % 2)).strip()
        rows.append({"prompt": f"question {i}?", "chosen": good, "rejected": bad})
    return rows


def _cfg(tiny_model, data, out, **train):
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.data.valid = str(tiny_model), str(data), str(data)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init = 4, 4.0, 0.0, "pissa"
    cfg.quant.group_size = 32
    cfg.train.out_dir = str(out)
    cfg.train.batch_size, cfg.train.lr, cfg.train.warmup = 4, 5e-3, 0
    cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = 1, 0, 100
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_first_dpo_loss_is_log2_with_pissa_reference_and_margins_start_at_zero(tiny_model, jsonl, tmp_path):
    data = jsonl("prefs.jsonl", _pairs())
    run = train(_cfg(tiny_model, data, tmp_path / "run", steps=1, lr=0.0), kind="dpo")
    first = [r for r in _records(run) if r["split"] == "train"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert (run / "reference_logps.safetensors").is_file()


def test_dpo_training_raises_reward_accuracy_on_separable_pairs(tiny_model, jsonl, tmp_path):
    data = jsonl("prefs.jsonl", _pairs())
    run = train(_cfg(tiny_model, data, tmp_path / "run", steps=25, lr=2e-2, eval_every=25), kind="dpo")
    recs = _records(run)
    valid = [r for r in recs if r["split"] == "valid"][-1]
    assert valid["rewards/accuracy"] >= 0.9
    assert valid["rewards/margin"] > 0.1
    assert valid["loss"] < math.log(2) - 0.1


def test_dpo_resume_is_exact(tiny_model, jsonl, tmp_path):
    data = jsonl("prefs.jsonl", _pairs())
    straight = train(_cfg(tiny_model, data, tmp_path / "a", steps=6), kind="dpo")
    cfg = _cfg(tiny_model, data, tmp_path / "b", steps=6)
    train(cfg, kind="dpo", stop_at=3)
    resumed = train(cfg, kind="dpo", resume=str(tmp_path / "b"))
    la = [r["loss"] for r in _records(straight) if r["split"] == "train"]
    lb = [r["loss"] for r in _records(resumed) if r["split"] == "train"]
    np.testing.assert_allclose(lb, la, atol=1e-5)
