"""Experiment trackers (`train.report_to: [tensorboard, wandb, trackio]`): the records of metrics.jsonl, sent on.

Rank 0 alone reports, as it alone writes metrics.jsonl; a record goes to every tracker as
`<split>/<name>` = value at its step (train/loss, valid/loss, train/rewards/margins ...), numbers only.
Each tracker is an optional extra (`pip install "forge-tune[tensorboard]"`, `[wandb]`, `[trackio]`); a named
one that is not installed stops the run before it starts, with the command that installs it.

Network: TensorBoard and Trackio write local files (Trackio: its local store; no Space is named). W&B goes
online only when the user has set it up (WANDB_MODE, WANDB_API_KEY or a `wandb login` entry in ~/.netrc);
otherwise it runs offline, in the run dir, to upload later with `wandb sync`.

Resume: a resumed run continues the same W&B / Trackio run (its id is kept in the run dir) and the same
TensorBoard directory. The steps a killed run logged after its last checkpoint are done again: TensorBoard is
told to drop its points past the checkpoint (a SessionLog START event at that step, TensorBoard's own way);
W&B keeps the first values of a step and ignores the redone ones (it takes no step it has seen), so its
curves can differ from metrics.jsonl between the checkpoint and the kill.
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from forge_core.atomic import write_text
from forge_core.errors import ForgeError

TRACKERS = ("tensorboard", "wandb", "trackio")
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


def scalars(record: dict) -> dict[str, float]:
    """{split/name: value} of a metrics.jsonl record's numbers (step and split are the coordinates)."""
    split = record.get("split", "train")
    return {f"{split}/{k}": float(v) for k, v in record.items()
            if k not in ("split", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in RUN/tensorboard, written with the tensorboard package's own writer (no TF, no torch)."""

    def __init__(self, run_dir: Path, start: int = 0):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(run_dir / "tensorboard"))
        if start:  # a resume: points past the checkpoint in earlier event files are orphans, to be dropped
            # (TensorBoard drops the points at and after a START event's step)
            self.writer.add_event(Event(wall_time=time.time(), step=start + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self, failed: bool = False) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_mode() -> str:
    """WANDB_MODE when set; online when W&B credentials exist (env or ~/.netrc); else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or None)
        return "online" if rc.authenticators("api.wandb.ai") else "offline"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return "offline"


def _run_id(run_dir: Path, tracker: str) -> str:
    """The tracker's run id, kept in RUN/trackers.json so that a resume continues the same tracked run."""
    path = run_dir / "trackers.json"
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if tracker not in ids:
        ids[tracker] = f"{run_dir.name}-{os.urandom(4).hex()}"
        write_text(path, json.dumps(ids, indent=1) + "\n")
    return ids[tracker]


class WandB:
    def __init__(self, run_dir: Path, config: dict, project: str):
        import wandb

        self.mode = wandb_mode()
        self.run = wandb.init(project=project, name=run_dir.resolve().name, id=_run_id(run_dir, "wandb"),
                              resume="allow", dir=str(run_dir), config=config, mode=self.mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Trackio:
    def __init__(self, run_dir: Path, config: dict, project: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=_run_id(run_dir, "trackio"), config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self, failed: bool = False) -> None:
        self.trackio.finish()


def check_installed(names: list[str]) -> None:
    """Stop before a run starts when a named tracker is unknown or not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ForgeError(f"train.report_to: unknown tracker '{name}'; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(_MODULE[name]) is None:
            raise ForgeError(f"train.report_to names {name}, which is not installed: pip install \"forge-tune[{name}]\"")


class Trackers:
    """The trackers of a run, fed each record that metrics.jsonl gets."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: dict) -> None:
        values = scalars(record)
        for t in self.trackers:
            t.log(int(record["step"]), values)

    def close(self, failed: bool = False) -> None:
        """Close every tracker, even when one fails to (that one is said on stderr, not raised over the run's
        own outcome)."""
        for t in self.trackers:
            try:
                t.close(failed)
            except Exception as e:  # noqa: BLE001 - a tracker's own trouble must not hide the run's result
                print(f"forge: closing {type(t).__name__} failed: {type(e).__name__}: {e}", file=sys.stderr)


def _start(name: str, run_dir: Path, config: dict, project: str, start: int):
    try:
        if name == "tensorboard":
            return TensorBoard(run_dir, start)
        return WandB(run_dir, config, project) if name == "wandb" else Trackio(run_dir, config, project)
    except ForgeError:
        raise
    except Exception as e:  # noqa: BLE001 - network, credentials, a broken install: one line, before any step
        raise ForgeError(f"train.report_to: starting {name} failed: {type(e).__name__}: {e}") from None


@contextmanager
def opened(names: list[str], run_dir: Path, config: dict, main: bool, console=None, start: int = 0):
    """Trackers for the run (none off rank 0), closed however the run ends; `start`: the step a resume
    continues from."""
    if not main or not names:
        yield Trackers([])
        return
    check_installed(names)
    run_dir = Path(run_dir)
    project = config.get("train", {}).get("project") or "forge"
    trackers = Trackers([])
    failed = True
    try:
        for n in names:
            trackers.trackers.append(_start(n, run_dir, config, project, start))
            if console is not None and n == "wandb":
                mode = trackers.trackers[-1].mode
                console.print(f"W&B: {mode}" + (f" (upload later: wandb sync {run_dir / 'wandb'})"
                                                 if mode == "offline" else ""))
        yield trackers
        failed = False
    finally:
        trackers.close(failed)
