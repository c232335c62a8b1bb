"""forge_mlx's runtime memory guard: a peak over the limit or an out-of-memory error stops the run cleanly
with a checkpoint, and resuming from it finishes exactly like a run that was never stopped."""

import json

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

import forge_mlx.step as step_mod
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.rundir import RunDir
from tests.forge_mlx.run import train

pytestmark = pytest.mark.mlx

# MLX's own message when a Metal buffer would not fit (mlx/backend/metal/allocator.cpp)
METAL_OOM = ("[metal::malloc] Attempting to allocate 137438953472 bytes which is greater than the maximum "
             "allowed buffer size of 77309411328 bytes.")


def _rows(n=16):
    words = ["red", "blue", "green", "gold"]
    return [{"messages": [{"role": "user", "content": f"color {i}"},
                          {"role": "assistant", "content": f"{words[i % 4]} {words[i % 4]}"}]}
            for i in range(n)]


def _cfg(tiny_model, data, out, limit="", **train):
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(data), str(out)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = 4, 4.0, 0.1  # dropout: the RNG must resume too
    cfg.quant.group_size = 32
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup = 4, 4, 5e-3, 1
    cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = 1, 0, 2
    cfg.memory.limit = limit
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _tensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path))


def _assert_same(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)


def _losses(run):
    return [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]


@pytest.fixture
def straight(tiny_model, jsonl, tmp_path):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4)."""
    return train(_cfg(tiny_model, jsonl("train.jsonl", _rows()), tmp_path / "straight"))


def test_peak_over_limit_stops_at_step_1_with_a_checkpoint_and_resume_matches(tiny_model, tmp_path, straight):
    data = tmp_path / "train.jsonl"
    out = tmp_path / "guarded"
    with pytest.raises(ForgeError) as err:
        train(_cfg(tiny_model, data, out, limit="1KB"))
    msg = str(err.value)
    assert "\n" not in msg
    assert "at step 1 passed the memory limit 1.00 KiB (memory.limit = 1KB)" in msg
    ckpt = out / "checkpoints" / "step_000001"
    assert f"checkpoint of step 1 ({ckpt})" in msg and f"forge train --resume {out}" in msg
    assert RunDir(out).latest() == (1, ckpt) and (ckpt / "adapters.safetensors").is_file()
    assert not (out / "adapter").exists()
    # resumed with the limit raised: the same losses and final weights as the run that never stopped
    resumed = train(_cfg(tiny_model, data, tmp_path / "ignored", limit="64GB"), resume=str(out))
    np.testing.assert_allclose(_losses(resumed), _losses(straight), atol=1e-5)
    _assert_same(_tensors(resumed / "adapter" / "adapters.safetensors"),
                 _tensors(straight / "adapter" / "adapters.safetensors"))


def test_out_of_memory_in_step_3_keeps_step_2_and_resume_matches(tiny_model, tmp_path, straight, monkeypatch):
    """The error comes AFTER the optimizer update of step 3 was applied (lazily): the guard must put the
    step-2 weights and optimizer state back, so the saved checkpoint equals the straight run's step 2."""
    real = step_mod.Stepper._build

    def failing_at_step_3(self):
        micro, apply = real(self)
        calls = []

        def apply_then_fail(grads, count):
            norm = apply(grads, count)
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError(METAL_OOM)
            return norm

        return micro, apply_then_fail

    monkeypatch.setattr(step_mod.Stepper, "_build", failing_at_step_3)
    data, out = tmp_path / "train.jsonl", tmp_path / "oom"
    with pytest.raises(ForgeError) as err:
        train(_cfg(tiny_model, data, out, save_every=100))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("out of memory at step 3 ([metal::malloc] Attempting to allocate")
    ckpt = out / "checkpoints" / "step_000002"
    assert f"checkpoint of step 2 ({ckpt})" in msg
    assert RunDir(out).latest() == (2, ckpt)
    ref = straight / "checkpoints" / "step_000002"
    _assert_same(_tensors(ckpt / "adapters.safetensors"), _tensors(ref / "adapters.safetensors"))
    _assert_same(_tensors(ckpt / "optimizer.safetensors"), _tensors(ref / "optimizer.safetensors"))
    assert json.loads((ckpt / "state.json").read_text()) == json.loads((ref / "state.json").read_text())

    monkeypatch.undo()
    resumed = train(_cfg(tiny_model, data, tmp_path / "ignored"), resume=str(out))
    np.testing.assert_allclose(_losses(resumed), _losses(straight), atol=1e-5)
    _assert_same(_tensors(resumed / "adapter" / "adapters.safetensors"),
                 _tensors(straight / "adapter" / "adapters.safetensors"))


def test_other_errors_in_a_step_are_not_swallowed(tiny_model, jsonl, tmp_path, monkeypatch):
    def broken(self):
        def micro(batch):
            raise RuntimeError("[matmul] Last dimension of first input with shape (4,8) must match")

        return micro, None

    monkeypatch.setattr(step_mod.Stepper, "_build", broken)
    with pytest.raises(RuntimeError, match=r"\[matmul\]"):
        train(_cfg(tiny_model, jsonl("train.jsonl", _rows()), tmp_path / "run"))
    assert RunDir(tmp_path / "run").latest() is None


def test_cli_stops_in_one_line_and_resumes_with_a_raised_limit(tiny_model, jsonl, tmp_path):
    from click.testing import CliRunner

    from forge_core.cli import cli

    data, out = jsonl("train.jsonl", _rows(8)), tmp_path / "run"
    args = ["--backend", "mlx", "--set", "quant.group_size=32"]
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "--model", str(tiny_model), "--data", str(data), "--steps", "3",
                              "--out", str(out), "--rank", "4", "--set", "memory.limit=1KB", *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("forge: error:")]
    assert len(errors) == 1 and "passed the memory limit 1.00 KiB" in errors[0], res.output
    assert f"forge train --resume {out}" in errors[0] and "--set memory.limit=SIZE" in errors[0]
    assert RunDir(out).latest()[0] == 1
    res = runner.invoke(cli, ["train", "--resume", str(out), "--set", "memory.limit=64GB", *args])
    assert res.exit_code == 0, res.output
    assert (out / "adapter" / "forge.json").is_file()
    assert json.loads((out / "config.json").read_text())["memory"]["limit"] == "1KB"  # the run's record stays
