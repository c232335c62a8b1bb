"""The CLI surface: `forge --help` and every command's help work with no framework importable."""

import subprocess
import sys

import pytest

from forge_core.cli import cli

COMMANDS = ["train", "dpo", "generate", "eval", "export", "convert", "memory", "models", "demo"]

BLOCK = """
import sys
for name in ("mlx", "mlx_lm", "torch", "bitsandbytes", "peft", "transformers"):
    sys.modules[name] = None  # any import of these now raises ImportError
from forge_core.cli import cli
for args in {args!r}:
    try:
        cli(args, standalone_mode=False)
    except SystemExit as e:
        assert not e.code, (args, e.code)
print("ok")
"""


def test_help_works_without_mlx_torch_or_transformers():
    args = [["--help"]] + [[c, "--help"] for c in COMMANDS]
    out = subprocess.run([sys.executable, "-c", BLOCK.format(args=args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_is_registered(command):
    assert command in cli.commands


def test_unknown_config_key_is_one_clear_line(tmp_path):
    from click.testing import CliRunner

    res = CliRunner().invoke(cli, ["memory", "--set", "train.lrr=1"])
    assert res.exit_code == 2
    assert "unknown config key 'train.lrr'" in res.output
    assert "Traceback" not in res.output


def test_bad_yaml_recipe_names_file_and_line(tmp_path):
    from click.testing import CliRunner

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  lr: [1,\n")
    res = CliRunner().invoke(cli, ["memory", "--config", str(recipe)])
    assert res.exit_code == 2 and f"{recipe}:" in res.output and "not valid YAML" in res.output


def test_dpo_trains_at_dpo_lr_and_its_lr_option_sets_it(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import forge_core.launch as launch_mod

    seen = {}
    monkeypatch.setattr(launch_mod, "launch", lambda cfg, kind, resume=None, force=False: seen.update(cfg=cfg))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    res = CliRunner().invoke(cli, ["dpo", "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert seen["cfg"].dpo.lr == 2e-5
    res = CliRunner().invoke(cli, ["dpo", "--data", str(data), "--lr", "5e-6"])
    assert res.exit_code == 0 and seen["cfg"].dpo.lr == 5e-6 and seen["cfg"].train.lr == 2e-4


def test_launch_runs_dpo_at_dpo_lr(monkeypatch, tmp_path):
    import types

    import forge_core.launch as launch_mod
    import forge_core.train as train_mod
    from forge_core.config import ForgeConfig

    got = {}
    monkeypatch.setattr(train_mod, "train", lambda cfg, kind, **kw: got.update(lr=cfg.train.lr, kind=kind))
    monkeypatch.setattr(launch_mod.backends, "resolve", lambda name: "mlx")
    monkeypatch.setattr(launch_mod.backends, "ops", lambda name: types.SimpleNamespace(init_world=lambda: (0, 1)))
    monkeypatch.setattr(launch_mod, "memory_check", lambda *a, **k: None)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    cfg = ForgeConfig()
    cfg.data.train, cfg.dpo.lr = str(data), 7e-6
    launch_mod.launch(cfg, kind="dpo")
    assert got == {"lr": 7e-6, "kind": "dpo"}
    cfg.train.lr = 3e-4
    launch_mod.launch(cfg, kind="sft")
    assert got["lr"] == 3e-4
