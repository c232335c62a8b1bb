"""The training progress bar (rich): step, loss, tok/s, peak memory, ETA. Shared by both backends."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

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


# A line at most this often when stderr is not a terminal (logs, CI): enough to see a long build move.
BUILD_LINE_SECONDS = 10.0


def building(paths: list[str], what: str = "PiSSA + quantize") -> Iterator[tuple[int, str]]:
    """Iterate (index, module path) over the layers a build adapts, showing its progress on stderr: a bar of
    blocks with an ETA on a terminal, else a line per block at most every BUILD_LINE_SECONDS (and the last).
    Both backends' model surgery loops over this, so a 1B model's minutes of SVD are never a silent wait.
    Under a launcher only rank 0 shows it."""
    from forge_core.distributed import env_rank

    console = Console(stderr=True, quiet=env_rank() != 0, soft_wrap=True)
    blocks = [_block_of(p) for p in paths]
    total = len(dict.fromkeys(blocks))
    progress = Progress(TextColumn(f"[bold]build[/] {what}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("blocks"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, disable=not console.is_terminal, transient=True)
    task = progress.add_task("build", total=total)
    start = last_line = time.perf_counter()
    done = 0
    with progress:
        for i, path in enumerate(paths):
            yield i, path
            if i + 1 < len(paths) and blocks[i + 1] == blocks[i]:
                continue
            done += 1
            progress.update(task, completed=done)
            now = time.perf_counter()
            if progress.disable and (now - last_line >= BUILD_LINE_SECONDS or done == total):
                eta = (now - start) / done * (total - done)
                console.print(f"build: {done}/{total} blocks ({i + 1} layers, {what}) in {now - start:.0f}s"
                              + (f", about {eta:.0f}s left" if done < total else ""), highlight=False)
                last_line = now


def _block_of(path: str) -> str:
    parts = path.split(".")
    return parts[parts.index("layers") + 1] if "layers" in parts[:-1] else path


def say(text: str) -> None:
    """One line on stderr about the run being set up (rank 0 only under a launcher)."""
    from forge_core.distributed import env_rank

    Console(stderr=True, quiet=env_rank() != 0, soft_wrap=True).print(text, highlight=False, markup=False)
