"""Experiment trackers (`train.report_to: [tensorboard, wandb, trackio]`): the records of metrics.jsonl, sent on.

Rank 0 alone reports, as it alone writes metrics.jsonl; a record goes to every tracker as
`<split>/<name>` = value at its step (train/loss, valid/loss, train/rewards/margins ...), numbers only.
Each tracker is an optional extra (`pip install "forge-tune[tensorboard]"`, `[wandb]`, `[trackio]`); a named
one that is not installed stops the run before it starts, with the command that installs it.

Network: TensorBoard and Trackio write local files (Trackio: its local store; no Space is named). W&B goes
online only when the user has set it up (WANDB_MODE, WANDB_API_KEY or a `wandb login` entry in ~/.netrc);
otherwise it runs offline, in the run dir, to upload later with `wandb sync`. A resumed run continues the same
W&B / Trackio run (its id is kept in the run dir).
"""

from __future__ import annotations

import importlib.util
import json
import netrc
import os
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

    def __init__(self, run_dir: Path):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.writer = EventFileWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
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
    def __init__(self, run_dir: Path, config: dict, name: str, project: str):
        import wandb

        self.mode = wandb_mode()
        self.run = wandb.init(project=project, name=name, id=_run_id(run_dir, "wandb"), resume="allow",
                              dir=str(run_dir), config=config, mode=self.mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, run_dir: Path, config: dict, name: str, project: str):
        import trackio

        self.trackio = trackio
        trackio.init(project=project, name=_run_id(run_dir, "trackio"), config=config, resume="allow")

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
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

    def close(self) -> None:
        for t in self.trackers:
            t.close()


@contextmanager
def opened(names: list[str], run_dir: Path, config: dict, main: bool, console=None):
    """Trackers for the run (none off rank 0), closed however the run ends."""
    if not main or not names:
        yield Trackers([])
        return
    check_installed(names)
    run_dir, name = Path(run_dir), Path(run_dir).resolve().name
    project = config.get("train", {}).get("project") or "forge"
    made = []
    try:
        for n in names:
            made.append(TensorBoard(run_dir) if n == "tensorboard"
                        else WandB(run_dir, config, name, project) if n == "wandb"
                        else Trackio(run_dir, config, name, project))
            if console is not None and n == "wandb":
                console.print(f"W&B: {made[-1].mode}" + (" (upload later: wandb sync " f"{run_dir / 'wandb'})"
                                                         if made[-1].mode == "offline" else ""))
        trackers = Trackers(made)
        yield trackers
    finally:
        Trackers(made).close()
