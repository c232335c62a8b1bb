"""A polite stop: SIGTERM (or Ctrl-C) during training ends the step under way, saves it and exits non-zero with
one line; --resume then ends bit-identical to a run never stopped (both backends, in process). A checkpoint by
time (train.save_every_minutes). `forge ... --nproc N` exits as its ranks did (rank_status.py)."""

import os
import signal

import numpy as np
import pytest
from safetensors.numpy import load_file

from forge_core import rank_status
from forge_core.config import ForgeConfig
from forge_core.rundir import RunDir
from forge_core.stopping import Stopped, StopRequest
from tests.test_preference_methods import BACKENDS

WEIGHTS = {"mlx": "adapters.safetensors", "cuda": "adapter_model.safetensors"}


def _rows(n=16):
    words = ["red", "blue", "green", "gold"]
    return [{"messages": [{"role": "user", "content": f"color {i}"},
                          {"role": "assistant", "content": f"{words[i % 4]} {words[(i * 3) % 4]}"}]} for i in range(n)]


def _cfg(tiny_model, data, out, steps=8):
    cfg = ForgeConfig()
    cfg.model.path, cfg.data.train, cfg.train.out_dir = str(tiny_model), str(data), str(out)
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.quant.group_size = 4, 4.0, 0.1, 32  # dropout: the RNG too
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr, cfg.train.warmup = steps, 3, 5e-3, 2  # 16 rows / 3: wraps
    cfg.train.log_every, cfg.train.eval_every, cfg.train.save_every = 1, 0, 100
    return cfg


def _train(backend):
    if backend == "mlx":
        from tests.forge_mlx.run import train
    else:
        from tests.forge_cuda.run import train
    return train


def _signal_after(monkeypatch, step, signum):
    """Send `signum` to this process when the loop logs `step` (inside the step, before its save)."""
    original = RunDir.log

    def log(self, rec):
        original(self, rec)
        if rec["split"] == "train" and rec["step"] == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(RunDir, "log", log)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigterm_saves_the_step_it_stopped_at_and_resume_is_exact(backend, tiny_model, jsonl, tmp_path, monkeypatch):
    train = _train(backend)
    data = jsonl("train.jsonl", _rows())
    straight = train(_cfg(tiny_model, data, tmp_path / "straight"))
    cfg = _cfg(tiny_model, data, tmp_path / "stopped")
    _signal_after(monkeypatch, 3, signal.SIGTERM)
    with pytest.raises(Stopped, match=r"stopped by SIGTERM after step 3/8, saved in .*step_000003; continue with "
                                      r"`forge train --resume .*stopped`") as stop:
        train(cfg)
    assert stop.value.exit_code == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert RunDir(tmp_path / "stopped").latest()[0] == 3  # save_every is 100: the stop saved its own step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop's handler is gone with the loop
    resumed = train(cfg, resume=str(tmp_path / "stopped"))
    a, b = (load_file(str(r / "adapter" / WEIGHTS[backend])) for r in (straight, resumed))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_ctrl_c_stops_politely_and_a_second_one_at_once():
    with StopRequest() as stop:
        assert stop.requested == 0
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested == signal.SIGINT  # heard, not raised: the step goes on
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_first_signal_is_passed_on_once():
    heard = []
    with StopRequest(on_first=heard.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert heard == [signal.SIGTERM] and stop.requested == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert heard == [signal.SIGTERM]


def test_the_launchers_stop_file_asks_for_a_stop(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_STOP_FILE", str(tmp_path / "stop"))
    with StopRequest() as stop:
        assert stop.requested == 0
        (tmp_path / "stop").touch()
        assert stop.requested == signal.SIGTERM


@pytest.mark.mlx
@pytest.mark.parametrize("minutes,saved", [(1.0, [2, 3]), (0.0, [3])])
def test_a_checkpoint_by_time(minutes, saved, tiny_model, jsonl, tmp_path, monkeypatch):
    pytest.importorskip("mlx.core")
    from forge_core import train as train_module

    clock = iter(range(0, 10_000, 100))  # each call of time.monotonic() 100 s later: every step passes 1 minute
    monkeypatch.setattr(train_module.time, "monotonic", lambda: next(clock))
    cfg = _cfg(tiny_model, jsonl("train.jsonl", _rows()), tmp_path / "run", steps=4)
    cfg.train.save_every_minutes = minutes
    _train("mlx")(cfg, stop_at=3)
    # save_every is 100: with 1 minute every step saved by time (the newest 2 kept); step 3 by stop_at
    assert sorted(s for s, _ in RunDir(tmp_path / "run").checkpoints()) == saved


def test_the_launch_exits_as_its_ranks_did():
    ok = {"rc": 0, "error": "", "printed": False, "peer_lost": False}
    assert rank_status.verdict({0: ok, 1: ok}, 0) == (0, "")
    bad = {"rc": 2, "error": "data.jsonl:3: bad row", "printed": False, "peer_lost": False}
    lost = {"rc": 2, "error": "rank 0 of 2 lost the other ranks", "printed": True, "peer_lost": True}
    assert rank_status.verdict({0: lost, 1: bad}, 0) == (2, "rank 1 of 2 failed: data.jsonl:3: bad row")
    assert rank_status.verdict({0: {**bad, "printed": True}, 1: bad}, 0) == (2, "")  # rank 0 said it already
    code, line = rank_status.verdict({0: ok, 1: None}, 0)  # killed: no status; mlx.launch still exits 0
    assert code == 1 and "rank 1 of 2 ended without a word" in line
    stopped = {"rc": 143, "error": "stopped by SIGTERM after step 4/8", "printed": True, "peer_lost": False}
    assert rank_status.verdict({0: stopped, 1: {**stopped, "printed": False}}, 0) == (143, "")
