"""train.report_to: TensorBoard event files hold the records of metrics.jsonl; W&B and Trackio get the same
values (stand-in modules record the calls); W&B stays offline unless the user set it up."""

import io
import json
import sys
import types

import pytest
from rich.console import Console

from forge_core import tracking
from forge_core.errors import ForgeError

REC = {"split": "train", "step": 3, "loss": 1.5, "lr": 1e-4, "rewards/margins": 0.25, "note": "x", "ok": True}


def test_scalars_are_the_numbers_of_a_record_under_its_split():
    assert tracking.scalars(REC) == {"train/loss": 1.5, "train/lr": 1e-4, "train/rewards/margins": 0.25}


def test_wandb_is_offline_unless_the_user_set_it_up(monkeypatch, tmp_path):
    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode() == "offline"  # no credentials anywhere
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    (tmp_path / "netrc").chmod(0o600)
    assert tracking.wandb_mode() == "online"  # `wandb login` wrote this
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"  # the user's word wins


def test_an_unknown_or_missing_tracker_stops_before_the_run(monkeypatch):
    with pytest.raises(ForgeError, match="unknown tracker 'mlflow'"):
        tracking.check_installed(["mlflow"])
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ForgeError, match=r'pip install "forge-tune\[wandb\]"'):
        tracking.check_installed(["wandb"])


class _Recorder(types.ModuleType):
    """A stand-in wandb / trackio module: records init, log and finish."""

    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def init(self, **kw):
        self.calls.append(("init", kw))
        return self

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def finish(self, exit_code=0):
        self.calls.append(("finish",) if not exit_code else ("finish", exit_code))


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_wandb_and_trackio_get_each_record_and_a_resume_continues_the_run(name, monkeypatch, tmp_path):
    mod = _Recorder(name)
    monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(tracking, "check_installed", lambda names: None)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    config = {"train": {"project": "proj"}}
    for _ in range(2):  # a run, then its resume
        with tracking.opened([name], tmp_path, config, main=True, console=Console(file=io.StringIO())) as t:
            t.log(REC)
    inits = [c[1] for c in mod.calls if c[0] == "init"]
    assert inits[0]["project"] == "proj" and inits[0]["config"] == config and inits[0]["resume"] == "allow"
    key = "id" if name == "wandb" else "name"
    assert inits[0][key] == inits[1][key]  # the resume continues the same tracked run
    if name == "wandb":
        assert inits[0]["mode"] == "offline" and inits[0]["dir"] == str(tmp_path)
    assert [c for c in mod.calls if c[0] == "log"] == [("log", tracking.scalars(REC), 3)] * 2
    assert [c[0] for c in mod.calls] == ["init", "log", "finish"] * 2


def test_ranks_other_than_0_report_nothing(tmp_path):
    with tracking.opened(["tensorboard"], tmp_path, {}, main=False) as t:
        t.log(REC)
    assert not (tmp_path / "tensorboard").exists()


def test_a_training_run_writes_its_records_to_tensorboard(tiny_model, tmp_path):
    pytest.importorskip("mlx.core")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.forge_mlx.run import train
    from tests.forge_mlx.test_trainer import _cfg, _rows

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(16)))
    cfg = _cfg(tiny_model, data, tmp_path / "run", steps=4, eval_every=2)
    cfg.data.valid = str(data)
    cfg.train.report_to = ["tensorboard"]
    run = train(cfg, console=Console(file=io.StringIO()))
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for split in ("train", "valid"):
        want = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        got = [(e.step, e.value) for e in events.Scalars(f"{split}/loss")]
        assert len(want) >= 2 and [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6)  # float32 in the file
    assert "train/grad_norm" in events.Tags()["scalars"]


def test_a_failed_run_finishes_its_wandb_run_as_failed(monkeypatch, tmp_path):
    mod = _Recorder("wandb")
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setattr(tracking, "check_installed", lambda names: None)
    with pytest.raises(RuntimeError), tracking.opened(["wandb"], tmp_path, {}, main=True):
        raise RuntimeError("the step failed")
    assert mod.calls[-1] == ("finish", 1)


def test_a_tracker_that_cannot_start_is_one_line(monkeypatch, tmp_path):
    mod = _Recorder("wandb")
    mod.init = lambda **kw: (_ for _ in ()).throw(ConnectionError("no network"))
    monkeypatch.setitem(sys.modules, "wandb", mod)
    monkeypatch.setattr(tracking, "check_installed", lambda names: None)
    with pytest.raises(ForgeError, match="starting wandb failed: ConnectionError: no network"), \
            tracking.opened(["wandb"], tmp_path, {}, main=True):
        pass


def test_a_resume_drops_the_tensorboard_points_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tracking.opened(["tensorboard"], tmp_path, {}, main=True) as t:  # killed after step 4
        for step in range(1, 5):
            t.log({"split": "train", "step": step, "loss": float(step)})
    with tracking.opened(["tensorboard"], tmp_path, {}, main=True, start=2) as t:  # resumed from step 2
        for step in (3, 4):
            t.log({"split": "train", "step": step, "loss": 10.0 + step})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]
