"""forge_cuda's runtime memory guard: a CUDA peak over the limit or an out-of-memory error stops the run
cleanly with a checkpoint, and resuming from it finishes exactly like a run that was never stopped.

These run on the CPU. torch has no allocator peak there, so the peak test feeds the loop the number
torch.cuda.max_memory_allocated() would give (through ops.guard_peak, the one place the loop reads it);
the out-of-memory tests raise torch's real OutOfMemoryError with CUDA's message at a chosen point.
"""

import io
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from rich.console import Console
from safetensors.numpy import load_file

import forge_cuda.ops as ops_mod
import forge_cuda.step as step_mod
from forge_core.errors import ForgeError
from forge_core.rundir import RunDir
from tests.forge_cuda.run import train

pytestmark = pytest.mark.cuda

# the first line of torch's CUDA caching-allocator error
CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of "
            "which 1.50 GiB is free. Including non-PyTorch memory, this process has 77.67 GiB memory in use.")
SETS = {"quant__bits": 4, "lora__dropout": 0.1, "train__steps": 4, "train__batch_size": 3, "train__warmup": 1,
        "train__save_every": 2}


def quiet():
    return Console(file=io.StringIO())


def losses(run):
    return [r["loss"] for r in RunDir(run).metrics() if r["split"] == "train"]


def assert_same(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=atol, err_msg=k)


def assert_resume_matches(make_cfg, sft_file, run, straight):
    resumed = train(make_cfg(sft_file, out="ignored", **SETS), resume=str(run), console=quiet())
    np.testing.assert_allclose(losses(resumed), losses(straight), atol=1e-5)
    assert_same(load_file(str(resumed / "adapter" / "adapter_model.safetensors")),
                load_file(str(straight / "adapter" / "adapter_model.safetensors")))


@pytest.fixture
def straight(make_cfg, sft_file):
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4)."""
    return train(make_cfg(sft_file, out="straight", **SETS), console=quiet())


def test_cuda_peak_over_limit_stops_at_step_1_and_resume_matches(make_cfg, sft_file, straight, monkeypatch):
    monkeypatch.setattr(ops_mod, "guard_peak", lambda: 300 * 2**20)  # 300 MiB, as the allocator says
    with pytest.raises(ForgeError) as err:
        train(make_cfg(sft_file, out="guarded", memory__limit="1KB", **SETS), console=quiet())
    run = RunDir(make_cfg(sft_file, out="guarded").train.out_dir)
    msg = str(err.value)
    assert "\n" not in msg
    assert "measured peak 300.00 MiB at step 1 passed the memory limit 1.00 KiB (memory.limit = 1KB)" in msg
    assert f"checkpoint of step 1 ({run.checkpoint_dir(1)})" in msg
    assert f"forge train --resume {run.path}" in msg
    assert run.latest() == (1, run.checkpoint_dir(1)) and not run.file("adapter").exists()
    monkeypatch.undo()
    assert_resume_matches(make_cfg, sft_file, run.path, straight)


def test_on_the_cpu_the_peak_is_not_checked(make_cfg, sft_file):
    if torch.cuda.is_available():
        pytest.skip("a GPU reports an allocator peak")
    out = io.StringIO()
    run = train(make_cfg(sft_file, memory__limit="1KB", train__steps=2), console=Console(file=out, width=200))
    assert (run / "adapter").is_dir()
    assert "memory.limit 1KB: not checked here (cuda reports no allocator peak on this device)" in out.getvalue()


def _oom_at_call(n: int, real, before: bool):
    """real(...), raising CUDA's OutOfMemoryError on call n: before running it, or after (state changed)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and before:
            raise torch.OutOfMemoryError(CUDA_OOM)
        out = real(*args, **kwargs)
        if len(calls) == n:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return out

    return wrapped


def test_oom_in_backward_of_step_3_keeps_step_2_and_resume_matches(make_cfg, sft_file, straight, monkeypatch):
    """OOM after step 3's gradients were accumulated (the data moved on): the checkpoint of step 2 must hold
    step 2's weights, optimizer state AND data position - the straight run's step-2 checkpoint exactly."""
    monkeypatch.setattr(step_mod.Stepper, "accumulate", _oom_at_call(3, step_mod.Stepper.accumulate, before=False))
    cfg = make_cfg(sft_file, out="oom", **{**SETS, "train__save_every": 100})
    with pytest.raises(ForgeError) as err:
        train(cfg, console=quiet())
    run = RunDir(cfg.train.out_dir)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("out of memory at step 3 (CUDA out of memory. Tried to allocate")
    assert f"checkpoint of step 2 ({run.checkpoint_dir(2)})" in msg
    assert run.latest() == (2, run.checkpoint_dir(2))
    ours, ref = run.checkpoint_dir(2), RunDir(straight).checkpoint_dir(2)
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        assert_same(load_file(str(ours / name)), load_file(str(ref / name)))
    state = json.loads((ours / "state.json").read_text())
    assert state == json.loads((ref / "state.json").read_text())
    monkeypatch.undo()
    assert_resume_matches(make_cfg, sft_file, run.path, straight)


def test_oom_inside_the_optimizer_update_saves_nothing_half_updated(make_cfg, sft_file, monkeypatch):
    """OOM inside optimizer.step() of step 3 (after it changed the weights): step 3's state is unknown,
    nothing is saved, and the error points to the newest periodic checkpoint (step 2)."""
    real_make = step_mod.make_optimizer

    def make(cfg, params):
        opt = real_make(cfg, params)
        opt.step = _oom_at_call(3, opt.step, before=False)
        return opt

    monkeypatch.setattr(step_mod, "make_optimizer", make)
    cfg = make_cfg(sft_file, out="mid", **SETS)
    with pytest.raises(ForgeError, match=r"^out of memory at step 3 .*inside the optimizer's in-place update, so the "
                                         r"half-updated weights are not saved\).*checkpoint of step 2 "):
        train(cfg, console=quiet())
    run = RunDir(cfg.train.out_dir)
    assert run.latest() == (2, run.checkpoint_dir(2))
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step_000002"]
    # the same with no periodic checkpoint yet: nothing to resume from but step 0, and the error says so
    monkeypatch.setattr(step_mod, "make_optimizer", make)
    cfg = make_cfg(sft_file, out="mid2", **{**SETS, "train__save_every": 100})
    with pytest.raises(ForgeError, match=r"no checkpoint yet \(a resume starts from step 0\)"):
        train(cfg, console=quiet())
    assert RunDir(cfg.train.out_dir).latest() is None


def test_cli_oom_is_one_line_without_traceback(tiny_model, sft_file, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from forge_core.cli import cli

    monkeypatch.setattr(step_mod.Stepper, "accumulate", _oom_at_call(2, step_mod.Stepper.accumulate, before=True))
    out = tmp_path / "run"
    args = ["--model", str(tiny_model), "--data", str(sft_file), "--steps", "3", "--rank", "4", "--quant=4"]
    res = CliRunner().invoke(cli, ["train", "--backend", "cuda", "--out", str(out), *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("forge: error:")]
    assert len(errors) == 1 and "out of memory at step 2 (CUDA out of memory." in errors[0], res.output
    assert f"checkpoint of step 1 ({RunDir(out).checkpoint_dir(1)})" in errors[0]
    assert "(the memory plan's device budget)" in errors[0]  # launch handed the plan's budget to the guard
