"""The config a run uses is resolved once per process (forge_core/run_config.py) and is what the run saves."""

import json

import pytest
from click.testing import CliRunner

from forge_core import run_config
from forge_core.cli import cli
from forge_core.config import ForgeConfig

pytest.importorskip("mlx.core")


def test_a_resumed_cli_run_resolves_its_config_once(tiny_model, jsonl, tmp_path, monkeypatch):
    from tests.forge_mlx.run import train

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a b"}]}
            for i in range(8)]
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(jsonl("t.jsonl", rows)), str(tmp_path / "r")
    cfg.lora.rank, cfg.quant.group_size, cfg.train.steps, cfg.train.lr = 4, 32, 3, 1e-3
    train(cfg, stop_at=2)
    calls = []
    real = run_config.for_resume
    monkeypatch.setattr(run_config, "for_resume", lambda *a: calls.append(1) or real(*a))
    res = CliRunner().invoke(cli, ["train", "--resume", str(tmp_path / "r"), "--set", "train.lr=5"])
    assert res.exit_code == 0, res.output
    assert len(calls) == 1
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["train"]["lr"] == 1e-3  # a resume runs the saved config (train.lr=5 from this command is not it)
    assert json.loads((tmp_path / "r" / "adapter" / "forge.json").read_text())["config"] == saved
