"""The training progress bar (rich): step, loss, tok/s, peak memory, ETA. Shared by both backends."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from forge_core.memory.budget import human


class TrainProgress:
    """Context manager: `with TrainProgress(total, start) as p: p.update(step, loss=..., tok_s=..., peak=...)`."""

    def __init__(self, total: int, start: int = 0, label: str = "train", console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tok_s]} tok/s"),
            TextColumn("peak {task.fields[peak]}"), TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not sys.stderr.isatty() and not self.console.is_terminal,
        )
        self.task = self.progress.add_task(label, total=total, completed=start, loss="-", tok_s="-", peak="-", extra="")

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def update(self, step: int, loss: float | None = None, tok_s: float | None = None, peak: int | None = None,
               record: dict | None = None):
        fields = {}
        if record and "rewards/margin" in record:  # preference methods: rewards and the method's own terms
            parts = [f"acc {record['rewards/accuracy']:.2f}"] if "rewards/accuracy" in record else []
            parts.append(f"margin {record['rewards/margin']:.3f}")
            parts += [f"{k} {record[k]:.3f}" for k in ("kl", "nll_loss") if k in record]
            fields["extra"] = " ".join(parts)
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if tok_s is not None:
            fields["tok_s"] = f"{tok_s:.0f}"
        if peak is not None:
            fields["peak"] = human(peak)
        self.progress.update(self.task, completed=step, **fields)

    def print(self, text: str) -> None:
        self.progress.console.print(text)
