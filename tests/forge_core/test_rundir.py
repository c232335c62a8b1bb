"""The run directory: the latest pointer, checkpoint pruning, metrics on resume."""

from forge_core.rundir import KEEP_CHECKPOINTS, RunDir


def _checkpoint(run: RunDir, step: int) -> None:
    d = run.checkpoint_dir(step)
    d.mkdir(parents=True)
    (d / "state.json").write_text(f'{{"step": {step}}}')
    run.mark_latest(step)


def test_marking_a_checkpoint_keeps_the_newest_two_and_the_latest(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.latest() is None
    for step in (2, 4, 6, 8):
        _checkpoint(run, step)
    assert KEEP_CHECKPOINTS == 2
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step_000006", "step_000008"]
    assert run.latest() == (8, run.checkpoint_dir(8))


def test_an_older_latest_is_never_pruned(tmp_path):
    """A resumed run re-marks an older step (e.g. after an out-of-memory stop at step 3 saved step 2)."""
    run = RunDir(tmp_path / "run")
    for step in (2, 4, 6):
        _checkpoint(run, step)
    run.mark_latest(4)
    assert run.latest() == (4, run.checkpoint_dir(4))
    assert sorted(p.name for p in (run.path / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    for step in (1, 2, 3, 4):
        run.log({"split": "train", "step": step, "loss": 1.0 / step})
    run.log({"split": "valid", "step": 4, "loss": 0.3})
    run.truncate_metrics(2)
    assert [(r["split"], r["step"]) for r in run.metrics()] == [("train", 1), ("train", 2)]
