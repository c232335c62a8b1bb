"""Building the model to train at the sizes people train: the init cache, the visible build, damaged checkpoints,
and the settings where 0 means "never". Both backends where the behaviour is forge_core's."""

import json

import numpy as np
import pytest
from rich.console import Console
from safetensors.numpy import load_file

from forge_core import init_cache, progress
from forge_core.config import ForgeConfig
from forge_core.rundir import RunDir
from tests.test_preference_methods import BACKENDS


def _rows(n=16):
    words = ["red", "blue", "green", "gold"]
    return [{"messages": [{"role": "user", "content": f"color {i}"},
                          {"role": "assistant", "content": f"{words[i % 4]} {words[i % 4]}"}]} for i in range(n)]


def _cfg(tiny_model, data, out, **train):
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train = str(tiny_model), str(data)
    cfg.lora.rank, cfg.lora.alpha = 4, 4.0
    cfg.quant.group_size = 32
    cfg.train.out_dir = str(out)
    cfg.train.batch_size, cfg.train.lr, cfg.train.warmup, cfg.train.steps = 4, 5e-3, 1, 4
    cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = 1, 0, 100
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _train(backend):
    import importlib

    return importlib.import_module(f"tests.forge_{backend}.run").train


def _console():
    import io

    buf = io.StringIO()
    return Console(file=buf, width=200, soft_wrap=True), buf


def _same_adapter(a, b):
    wa, wb = (load_file(str(next((r / "adapter").glob("adapter*.safetensors")))) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert np.array_equal(wa[k], wb[k]), k


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_run_takes_the_factors_from_the_cache_no_svd_and_ends_bit_identical(
        backend, tiny_model, jsonl, tmp_path, monkeypatch):
    from forge_core import surgery

    monkeypatch.setenv("FORGE_INIT_CACHE", str(tmp_path / "cache"))
    train = _train(backend)
    data = jsonl("train.jsonl", _rows())
    svds = []
    real = surgery.pissa_factors
    monkeypatch.setattr(surgery, "pissa_factors", lambda *a, **k: svds.append(1) or real(*a, **k))

    console, out = _console()
    first = train(_cfg(tiny_model, data, tmp_path / "first"), console=console)
    assert len(svds) == 14 and "PiSSA factors cached in" in out.getvalue()  # 2 blocks x 7 targets
    console, out = _console()
    second = train(_cfg(tiny_model, data, tmp_path / "second"), console=console)
    assert len(svds) == 14, "the second run ran an SVD"
    assert "PiSSA factors from the init cache" in out.getvalue()
    _same_adapter(first, second)
    assert [e["layers_adapted"] for e in init_cache.entries()] == [14]


def test_a_damaged_cache_entry_is_said_removed_and_rebuilt(tiny_model, jsonl, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_INIT_CACHE", str(tmp_path / "cache"))
    train = _train("mlx")
    data = jsonl("train.jsonl", _rows())
    first = train(_cfg(tiny_model, data, tmp_path / "first"), console=_console()[0])
    (entry,) = init_cache.entries()
    f = tmp_path / "cache" / entry["id"] / init_cache.FACTORS
    raw = bytearray(f.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte in the last tensor: the size still matches, the checksum does not
    f.write_bytes(bytes(raw))
    console, out = _console()
    again = train(_cfg(tiny_model, data, tmp_path / "again"), console=console)
    text = out.getvalue()
    assert f"init cache entry {tmp_path / 'cache' / entry['id']} is damaged" in text
    assert "does not match its checksum" in text and "PiSSA factors cached in" in text  # rebuilt, re-stored
    _same_adapter(first, again)
    assert init_cache.lookup(entry["key"]) is not None  # the new entry reads back whole


def test_cache_ls_and_rm(tiny_model, jsonl, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from forge_core.cli import cli

    monkeypatch.setenv("FORGE_INIT_CACHE", str(tmp_path / "cache"))
    _train("mlx")(_cfg(tiny_model, jsonl("t.jsonl", _rows()), tmp_path / "r", steps=1), console=_console()[0])
    (entry,) = init_cache.entries()
    res = CliRunner().invoke(cli, ["cache", "ls"])
    assert res.exit_code == 0 and entry["id"] in res.output and "pissa_niter" in res.output
    res = CliRunner().invoke(cli, ["cache", "rm", "nosuch"])
    assert res.exit_code == 2 and "matches 0 entries" in res.output
    res = CliRunner().invoke(cli, ["cache", "rm", entry["id"][:6]])
    assert res.exit_code == 0 and "removed 1 init cache entry" in res.output and not init_cache.entries()


def test_the_build_shows_its_progress_per_block(tiny_model, monkeypatch, capsys):
    from forge_mlx import ops

    monkeypatch.setattr(progress, "BUILD_LINE_SECONDS", 0.0)  # a line per block (tiny blocks build in ms)
    cfg = ForgeConfig()
    cfg.model.path, cfg.lora.rank, cfg.quant.group_size = str(tiny_model), 4, 32
    ops.build_model(cfg)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("build:")]
    assert [ln.split(" (")[0] for ln in lines] == ["build: 1/2 blocks", "build: 2/2 blocks"]
    assert "randomized SVD (niter 4), quantize to 4-bit" in lines[0] and "s left" in lines[0]


def test_default_init_is_the_randomized_svd_and_pissa_is_the_exact_one(tiny_model):
    from forge_mlx import ops

    assert ForgeConfig().lora.init == "pissa_niter_4"
    w = load_file(str(tiny_model / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    best = np.linalg.norm(w - (u[:, :4] * s[:4]) @ vt[:4])
    for init in ("pissa", "pissa_niter_4"):
        cfg = ForgeConfig()
        cfg.model.path, cfg.lora.init, cfg.quant.bits = str(tiny_model), init, 0
        cfg.lora.rank, cfg.lora.alpha = 4, 4.0  # scale 1: s·B0·A0 = U_r S_r Vt_r
        _, _, _, factors = ops.build_model(cfg)
        a0, b0 = factors["model.layers.0.mlp.down_proj"]
        err = np.linalg.norm(w - b0 @ a0)
        if init == "pissa":  # exactly the top-4 singular triplets
            np.testing.assert_allclose(b0 @ a0, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(a0, axis=1) ** 2, s[:4], rtol=1e-4)
        else:  # the randomized one: nearly the best rank-4 approximation, not exactly it
            assert best <= err < best * 1.01 and not np.allclose(b0 @ a0, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_truncated_newest_checkpoint_resumes_from_the_one_before(backend, tiny_model, jsonl, tmp_path):
    train = _train(backend)
    data = jsonl("train.jsonl", _rows())
    straight = train(_cfg(tiny_model, data, tmp_path / "straight", steps=6))
    cfg = _cfg(tiny_model, data, tmp_path / "cut", steps=6, save_every=2)
    train(cfg, stop_at=5)  # checkpoints at 2, 4 and (the stop) 5
    run = RunDir(tmp_path / "cut")
    assert [s for s, _ in run.checkpoints()] == [5, 4]
    newest = run.checkpoint_dir(5) / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    console, out = _console()
    train(cfg, resume=str(run.path), console=console)
    text = out.getvalue()
    assert f"checkpoint {run.checkpoint_dir(5)} is damaged" in text and "using the one before it" in text
    assert "resuming" in text and "at step 4/6" in text
    _same_adapter(straight, run.path)


def test_no_intact_checkpoint_is_one_line_not_a_fresh_start(tiny_model, jsonl, tmp_path):
    from click.testing import CliRunner

    from forge_core.cli import cli

    train = _train("mlx")
    cfg = _cfg(tiny_model, jsonl("train.jsonl", _rows()), tmp_path / "cut", steps=4)
    train(cfg, stop_at=2)
    run = RunDir(tmp_path / "cut")
    for _, d in run.checkpoints():
        (d / "adapters.safetensors").write_bytes(b"\0" * 8)
    res = CliRunner().invoke(cli, ["train", "--resume", str(run.path), "--backend", "mlx"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "no intact checkpoint to resume from" in res.output.strip().splitlines()[-1]


def test_zero_means_never_for_save_every_and_log_every(tiny_model, jsonl, tmp_path):
    train = _train("mlx")
    cfg = _cfg(tiny_model, jsonl("train.jsonl", _rows()), tmp_path / "run", steps=5)
    cfg.train.save_every, cfg.train.log_every = 0, 0
    run = RunDir(train(cfg))
    assert [s for s, _ in run.checkpoints()] == [5]  # the end only
    assert [r["step"] for r in run.metrics() if r["split"] == "train"] == [1, 5]  # the first and the last
    state = json.loads((run.checkpoint_dir(5) / "state.json").read_text())
    assert set(state["files"]) == {"adapters.safetensors", "optimizer.safetensors"}


def test_an_mlx_forge_train_imports_no_torch(tiny_model, jsonl, tmp_path):
    """`python -X importtime -m forge_core.cli train` (the `forge` script's entry) on MLX: no torch module among the
    imports, and the run trains (transformers serves the tokenizer without it)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mlx.core")
    data = jsonl("train.jsonl", _rows(8))
    env = {**os.environ, "FORGE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "forge_core.cli", "train", "--backend", "mlx",
                          "--model", str(tiny_model), "--data", str(data), "--steps", "1", "--rank", "4",
                          "--set", "quant.group_size=32", "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert "mlx.core" in imported and "transformers" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]
    assert (tmp_path / "run" / "adapter" / "forge.json").is_file()
