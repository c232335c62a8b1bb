"""The CLI surface: `forge --help` and every command's help work with no framework importable."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError

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


def test_a_preference_run_trains_at_its_section_lr_unless_train_lr_is_given(monkeypatch, tmp_path):
    import forge_core.launch as launch_mod

    got = []
    monkeypatch.setattr(launch_mod, "launch", lambda cfg, kind, **kw: got.append((kind, cfg.train.lr)))
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    runner = CliRunner()
    for args in (["dpo", "--lr", "7e-6"], ["dpo", "--set", "train.lr=1e-5"], ["dpo", "--lr", "7e-6", "--set",
                 "train.lr=1e-5"], ["dpo"], ["orpo"], ["train", "--lr", "3e-4"]):
        res = runner.invoke(cli, [*args, "--data", str(data)])
        assert res.exit_code == 0, res.output
    assert got == [("dpo", 7e-6), ("dpo", 1e-5), ("dpo", 1e-5), ("dpo", ForgeConfig().dpo.lr),
                   ("orpo", ForgeConfig().orpo.lr), ("sft", 3e-4)]


def test_a_preference_run_on_an_adapter_refuses_a_different_lora_shape(tiny_model, tmp_path):
    from forge_core.run_config import resolve

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "forge.json").write_text(json.dumps({"config": {"model": {"path": str(tiny_model)},
                                                               "lora": {"rank": 8}}}))
    (adapter / "adapter_config.json").write_text("{}")
    cfg = resolve("dpo", sets=[f"dpo.adapter={adapter}"])
    assert cfg.lora.rank == 8 and cfg.model.path == str(tiny_model)
    with pytest.raises(ForgeError, match=r"lora.rank: 16 given, but dpo.adapter .* was trained with 8"):
        resolve("dpo", sets=[f"dpo.adapter={adapter}", "lora.rank=16"])
