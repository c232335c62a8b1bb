"""The framework-free half of the runtime memory guard: which errors are out-of-memory, the limit a run is
held to, the one-line stop error, and how launch() hands the plan's budget (and a resume's new limit) on."""

import types

import pytest

from forge_core.config import ForgeConfig
from forge_core.config_parse import build_config
from forge_core.errors import ForgeError
from forge_core.memory.guard import MemoryGuard, oom_summary, save_once
from forge_core.run_config import for_resume as resumed_config
from forge_core.rundir import RunDir


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError: recognised by its class name, as forge_core imports no torch."""


OOM = [
    MemoryError(),
    OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 7.79 GiB total capacity)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 1152921504606846976 bytes. Error code 12 (Cannot allocate memory)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max "
                 "allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("[metal::malloc] Attempting to allocate 137438953472 bytes which is greater than the "
                 "maximum allowed buffer size of 77309411328 bytes."),
    RuntimeError("[metal::malloc] Resource limit (499000) exceeded."),
    RuntimeError("[malloc] Unable to allocate 1073741824 bytes."),
    RuntimeError("std::bad_alloc"),
]
NOT_OOM = [
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("[matmul] Last dimension of first input with shape (4,8) must match second input shape."),
    RuntimeError("Expected all tensors to be on the same device, but found at least two devices"),
    RuntimeError("index 300 is out of bounds for dimension 0 with size 259"),
    ValueError("out of memory"),  # only RuntimeErrors carry the frameworks' allocator messages
    KeyError("memory"),
]


@pytest.mark.parametrize("exc", OOM, ids=lambda e: (type(e).__name__ + ":" + str(e))[:40])
def test_is_oom_recognises_the_frameworks_out_of_memory_errors(exc):
    assert MemoryGuard.is_oom(exc)


@pytest.mark.parametrize("exc", NOT_OOM, ids=lambda e: (type(e).__name__ + ":" + str(e))[:40])
def test_is_oom_leaves_other_errors_alone(exc):
    assert not MemoryGuard.is_oom(exc)


def test_is_oom_sees_an_out_of_memory_cause():
    try:
        try:
            raise MemoryError
        except MemoryError as inner:
            raise RuntimeError("step failed") from inner
    except RuntimeError as outer:
        assert MemoryGuard.is_oom(outer)


def test_oom_summary_is_the_first_line_shortened():
    exc = RuntimeError("CUDA out of memory. " + "x" * 300 + "\nsecond line")
    text = oom_summary(exc)
    assert text.startswith("CUDA out of memory. x") and text.endswith("...") and len(text) == 160
    assert oom_summary(MemoryError()) == "MemoryError"


def test_over_compares_the_peak_with_the_limit_and_0_disables():
    assert not MemoryGuard(0).over(10**15)
    guard = MemoryGuard(100)
    assert guard.over(101) and not guard.over(100) and not guard.over(None)


def _limit_of(text, planned=0):
    cfg = ForgeConfig()
    cfg.memory.limit = text
    return MemoryGuard.for_run(cfg, "sft", planned)


def test_limit_is_memory_limit_else_the_plans_budget():
    assert (_limit_of("", planned=5 * 2**30).limit, _limit_of("").limit) == (5 * 2**30, 0)
    assert _limit_of("", planned=7).source == "the memory plan's device budget"
    assert _limit_of("1KB", planned=7).limit == 1024
    assert _limit_of("6GB").limit == 6 * 2**30 and _limit_of("6GB").source == "memory.limit = 6GB"
    assert _limit_of("off", planned=7).limit == 0
    # YAML reads `--set memory.limit=off` as False; the config stores it as the string "False"
    cfg = build_config(sets=["memory.limit=off"])
    assert MemoryGuard.for_run(cfg, "sft", 7).limit == 0
    with pytest.raises(ForgeError, match=r"^memory.limit: 'lots' is not a size"):
        _limit_of("lots")


def test_check_saves_this_step_once_and_stops(tmp_path):
    run, saved = RunDir(tmp_path / "run"), []

    def save(step):
        saved.append(step)
        run.mark_latest(step)

    guard = MemoryGuard(1000, "memory.limit = 1000", "sft")
    guard.check(run, 3, 999, save)
    assert saved == []
    with pytest.raises(ForgeError, match=r"peak 1.00 KiB at step 3 passed the memory limit 1000 B \(memory"):
        guard.check(run, 3, 1000 + 24, save)
    with pytest.raises(ForgeError):
        guard.check(run, 3, 5000, save)  # already saved at step 3: not again
    assert saved == [3]


def test_save_once_skips_step_0_and_an_existing_checkpoint(tmp_path):
    run, saved = RunDir(tmp_path / "run"), []
    assert not save_once(run, 0, saved.append)
    run.mark_latest(2)
    assert not save_once(run, 2, saved.append)
    assert save_once(run, 3, saved.append) and saved == [3]


def test_stop_error_is_one_line_naming_the_checkpoint_and_what_to_do(tmp_path):
    run = RunDir(tmp_path / "run")
    run.mark_latest(2)
    guard = MemoryGuard(2**30, "memory.limit = 1GB", "dpo")
    msg = str(guard.stop_error(run, 3, 3 * 2**29, oom="CUDA out of memory."))
    assert "\n" not in msg
    assert msg.startswith("out of memory at step 3 (CUDA out of memory.); measured peak 1.50 GiB, "
                          "limit 1.00 GiB (memory.limit = 1GB)")
    assert f"resume point: checkpoint of step 2 ({run.checkpoint_dir(2)})" in msg
    assert f"`forge dpo --resume {run.path}` (add --set memory.limit=SIZE to raise the limit)" in msg
    assert f"`forge memory --config {run.file('config.json')} --method dpo`" in msg
    assert "train.batch_size" in msg and "--grad-checkpoint" in msg
    fresh = str(MemoryGuard(2**30, "the memory plan's device budget").stop_error(RunDir(tmp_path / "new"), 1))
    assert "peak not measured at step 1" in fresh
    assert "no checkpoint yet (a resume starts from step 0)" in fresh
    assert "forge train --resume" in fresh and "memory.limit=SIZE" not in fresh


def test_resume_keeps_the_runs_config_but_takes_memory_from_this_invocation(tmp_path):
    run = RunDir(tmp_path / "run")
    saved = ForgeConfig()
    saved.train.lr, saved.memory.limit = 3e-4, "1KB"
    run.save_config(saved.to_dict())
    now = ForgeConfig()
    now.memory.limit, now.memory.threshold = "8GB", 0.5
    cfg = resumed_config(run, now)
    assert cfg.train.lr == 3e-4 and (cfg.memory.limit, cfg.memory.threshold) == ("8GB", 0.5)


def _fake_launch(monkeypatch, tmp_path, plan):
    import forge_core.launch as launch_mod
    import forge_core.train as train_mod

    got = {}
    fake = types.SimpleNamespace(set_memory_limit=lambda n: got.update(allocator=n), init_world=lambda: (0, 1))
    monkeypatch.setattr(train_mod, "train", lambda cfg, kind, **kw: got.update(cfg=cfg, **kw))
    monkeypatch.setattr(launch_mod.backends, "resolve", lambda name: "mlx")
    monkeypatch.setattr(launch_mod.backends, "ops", lambda name: fake)
    monkeypatch.setattr(launch_mod, "memory_check", lambda *a, **k: plan)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    cfg = ForgeConfig()
    cfg.data.train = str(data)
    return launch_mod.launch, cfg, got


def test_launch_hands_the_plans_budget_to_the_allocator_and_the_guard(monkeypatch, tmp_path):
    launch, cfg, got = _fake_launch(monkeypatch, tmp_path, types.SimpleNamespace(budget_bytes=5 * 2**30))
    launch(cfg, kind="sft")
    assert got["allocator"] == got["memory_limit"] == 5 * 2**30
    launch, cfg, got = _fake_launch(monkeypatch, tmp_path, None)  # the planner could not size the model
    launch(cfg, kind="sft")
    assert got["memory_limit"] == 0 and "allocator" not in got  # 0: no budget, the guard checks nothing


def test_a_resume_raises_the_limit_from_the_command_line(monkeypatch, tmp_path):
    from forge_core import run_config

    launch, cfg, got = _fake_launch(monkeypatch, tmp_path, None)
    run = RunDir(tmp_path / "run")
    saved = ForgeConfig()
    saved.data.train, saved.train.lr, saved.memory.limit = cfg.data.train, 3e-4, "1KB"
    run.save_config(saved.to_dict())
    resolved = run_config.resolve("sft", sets=["memory.limit=8GB", "train.lr=1"], resume=str(run.path))
    launch(resolved, kind="sft", resume=str(run.path))
    assert got["cfg"].train.lr == 3e-4 and got["cfg"].memory.limit == "8GB" and got["resume"] == str(run.path)
