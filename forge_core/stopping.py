"""A polite stop: SIGTERM or SIGINT (Ctrl-C) during training ends the step under way, writes a checkpoint and
exits non-zero with one line saying how to resume - so a killed run continues from the step it stopped at, not
from the last `save_every`. A second signal stops at once (the default action).

Under a launcher every rank has its own StopRequest; the ranks agree on stopping at the end of each step
(World.max of the signal heard), so they stop after the same step whichever of them heard the signal. `forge ... --nproc N` runs the
launcher in its own session and asks its ranks to stop through a file (FORGE_STOP_FILE, relaunch.py): the
launchers themselves do not pass a polite signal on to their ranks.
"""

from __future__ import annotations

import os
import signal
import threading

from forge_core.errors import ForgeError

STOP_FILE_ENV = "FORGE_STOP_FILE"  # set by `forge --nproc`: the file whose existence asks every rank to stop


class Stopped(ForgeError):
    """The run stopped on a signal after saving its step; the exit code is the shell's for that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """Hears SIGTERM and SIGINT inside `with` (the main thread only: signal handlers live there): the first is
    recorded (and passed to `on_first`, when given), the second raises KeyboardInterrupt."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, on_first=None):
        self.signum = 0
        self.on_first = on_first
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:  # noqa: PYI034 (Self: Python 3.11+)
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._heard) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _heard(self, signum, frame) -> None:
        if self.signum:  # the second signal: no more politeness
            for s in self.SIGNALS:
                signal.signal(s, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signum = signum
        if self.on_first is not None:
            self.on_first(signum)

    @property
    def requested(self) -> int:
        """The signal heard (or SIGTERM when the launcher's stop file exists); 0: none."""
        if self.signum:
            return self.signum
        path = os.environ.get(STOP_FILE_ENV)
        return int(signal.SIGTERM) if path and os.path.exists(path) else 0


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
