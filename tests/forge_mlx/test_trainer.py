"""forge_mlx training loop on a tiny random model: loss falls, resume is exact, adapters load in mlx-lm."""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from tests.forge_mlx.run import train

pytestmark = pytest.mark.mlx


def _rows(n=24):
    words = ["red", "blue", "green", "gold"]
    return [{"messages": [{"role": "user", "content": f"color {i}"},
                          {"role": "assistant", "content": f"{words[i % 4]} {words[i % 4]}"}]} for i in range(n)]


def _cfg(tiny_model, data, out, **train):
    cfg = ForgeConfig()
    cfg.model.path = str(tiny_model)
    cfg.data.train = str(data)
    cfg.lora.rank, cfg.lora.alpha = 4, 4.0
    cfg.quant.group_size = 32
    cfg.train.out_dir = str(out)
    cfg.train.batch_size, cfg.train.lr, cfg.train.warmup = 4, 5e-3, 2
    cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = 1, 0, 100
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


def _weights(run):
    from safetensors.numpy import load_file

    return load_file(str(run / "adapter" / "adapters.safetensors"))


def test_qpissa_on_4bit_base_trains_loss_falls(tiny_model, jsonl, tmp_path):
    data = jsonl("train.jsonl", _rows())
    run = train(_cfg(tiny_model, data, tmp_path / "run", steps=30, lr=1e-2))
    losses = _losses(run)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    files = {p.name for p in (run / "adapter").iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "forge.json", "pissa_init.safetensors"} <= files
    assert (run / "loss.png").stat().st_size > 1000


def test_resume_is_exact_5_plus_5_equals_10(tiny_model, jsonl, tmp_path):
    data = jsonl("train.jsonl", _rows())
    cfg = _cfg(tiny_model, data, tmp_path / "straight", steps=10, grad_accum=2)
    cfg.lora.dropout = 0.1  # exercise the RNG too
    straight = train(cfg)
    cfg.train.out_dir = str(tmp_path / "resumed")
    train(cfg, stop_at=5)
    assert json.loads((tmp_path / "resumed" / "latest.json").read_text())["step"] == 5
    resumed = train(cfg, resume=str(tmp_path / "resumed"))
    np.testing.assert_allclose(_losses(resumed), _losses(straight), atol=1e-5)
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5)


def test_plain_lora_adapter_loads_in_mlx_lm_with_same_logits(tiny_model, jsonl, tmp_path):
    import mlx_lm

    from tests.forge_mlx.run import load_adapted

    data = jsonl("train.jsonl", _rows())
    cfg = _cfg(tiny_model, data, tmp_path / "run", steps=4, lr=5e-2)
    cfg.lora.init, cfg.quant.bits = "lora", 0
    run = train(cfg)
    ours, _, _ = load_adapted(str(run))
    theirs, _ = mlx_lm.load(str(tiny_model), adapter_path=str(run / "adapter"))
    x = mx.array([[257, 84, 82, 68, 81, 198, 71, 72]])
    base, _ = mlx_lm.load(str(tiny_model))
    assert np.abs(np.array(theirs(x)) - np.array(base(x))).max() > 1e-3  # the adapter does something
    np.testing.assert_allclose(np.array(ours(x)), np.array(theirs(x)), atol=1e-5)


def test_nan_loss_stops_with_a_clear_message(tiny_model, jsonl, tmp_path):
    data = jsonl("train.jsonl", _rows())
    cfg = _cfg(tiny_model, data, tmp_path / "run", steps=6, lr=1e30, save_every=2)
    cfg.train.max_grad_norm, cfg.train.warmup = 0.0, 0
    with pytest.raises(ForgeError, match=r"loss became (nan|inf).*(checkpoint|no checkpoint)"):
        train(cfg)


def test_existing_run_dir_is_not_overwritten(tiny_model, jsonl, tmp_path):
    data = jsonl("train.jsonl", _rows())
    cfg = _cfg(tiny_model, data, tmp_path / "run", steps=2)
    train(cfg)
    with pytest.raises(ForgeError, match="--resume"):
        train(cfg)


def test_gradient_checkpointing_gives_the_same_losses(tiny_model, jsonl, tmp_path):
    data = jsonl("train.jsonl", _rows())
    plain = train(_cfg(tiny_model, data, tmp_path / "plain", steps=4))
    ckpt = train(_cfg(tiny_model, data, tmp_path / "ckpt", steps=4, grad_checkpoint=True))
    np.testing.assert_allclose(_losses(ckpt), _losses(plain), atol=1e-5)


def test_cli_train_generate_eval(tiny_model, jsonl, tmp_path):
    from click.testing import CliRunner

    from forge_core.cli import cli

    data = jsonl("train.jsonl", _rows(8))
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--model", str(tiny_model), "--data", str(data), "--steps", "2",
                              "--out", str(out), "--rank", "4", "--set", "quant.group_size=32"])
    assert res.exit_code == 0, res.output
    assert (out / "adapter" / "forge.json").is_file()
    res = runner.invoke(cli, ["generate", "--adapter", str(out), "--prompt", "color 1", "--max-tokens", "5"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["eval", "--adapter", str(out), "--valid", str(data), "--json",
                              "--set", "eval.limit=2", "--set", "eval.max_new_tokens=4"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.output[res.output.index("{"):])
    # byte tokens: 4 new tokens are at most 4 characters, shorter than "red red" and "blue blue" -> 0 exact
    assert result["examples"] == 2 and result["loss"] > 0 and result["exact"] == 0.0
    bad = runner.invoke(cli, ["train", "--model", str(tiny_model), "--data", str(tmp_path / "missing.jsonl")])
    assert bad.exit_code == 2 and "missing.jsonl" in bad.output

