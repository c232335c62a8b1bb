"""The runtime side of the memory plan: a run that runs out of memory stops cleanly, with a checkpoint.

After every step the loop compares the measured peak with the limit (memory.limit, else the plan's
budget); a step that raises out-of-memory is recognised here by exception class and message, so
nothing here imports a framework.
"""

from __future__ import annotations

from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.memory.budget import human, parse_size
from forge_core.methods import method

# Substrings (lower case) of the out-of-memory errors the frameworks raise as plain RuntimeErrors:
#   torch CUDA "CUDA out of memory. Tried to allocate ..." (torch.OutOfMemoryError), MPS "MPS backend out of
#   memory", the CPU allocator "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes",
#   cuBLAS "CUBLAS_STATUS_ALLOC_FAILED"; MLX Metal "[metal::malloc] Attempting to allocate N bytes which is
#   greater than the maximum allowed buffer size" / "[metal::malloc] Resource limit (N) exceeded", MLX's
#   allocator "[malloc] Unable to allocate N bytes.", Metal's "Insufficient Memory"; C++ std::bad_alloc.
OOM_MARKERS = ("out of memory", "attempting to allocate", "[metal::malloc]", "unable to allocate",
               "can't allocate memory", "alloc_failed", "insufficient memory", "bad_alloc")
_LIMIT_OFF = {"off", "false", "no", "none", "0"}  # YAML reads --set memory.limit=off as False


class MemoryGuard:
    """The runtime side of the memory plan: a run that runs out of memory stops cleanly, with a checkpoint.

    Two ways out, both a ForgeError (one line, no traceback):
      over(peak)   after a completed step, the measured peak passed `limit_bytes` (0 = not checked): the
                   loop saves THIS step and stops;
      is_oom(exc)  the framework raised out-of-memory inside a step: the step did not happen, the loop puts
                   the pre-step state back, saves the step before and stops.
    Frameworks are recognised by exception class name and message, so nothing here imports them.
    """

    def __init__(self, limit_bytes: int = 0, source: str = "", kind: str = "sft"):
        self.limit, self.source, self.kind = int(limit_bytes or 0), source, kind

    @classmethod
    def for_run(cls, cfg: ForgeConfig, kind: str, planned_bytes: int = 0) -> MemoryGuard:
        """memory.limit when set ("off": no peak check), else the plan's budget launch() passes (0: none)."""
        text = str(cfg.memory.limit).strip()
        if not text:
            return cls(planned_bytes, "the memory plan's device budget", kind)
        if text.lower() in _LIMIT_OFF:
            return cls(0, "memory.limit = off", kind)
        try:
            return cls(parse_size(text), f"memory.limit = {text}", kind)
        except ForgeError:
            raise ForgeError(f"memory.limit: '{text}' is not a size; write it like 6GB or 512MB, 'off' for "
                             "no peak check, or leave it empty for the memory plan's budget") from None

    def over(self, peak_bytes) -> bool:
        return bool(self.limit) and peak_bytes is not None and peak_bytes > self.limit

    @staticmethod
    def is_oom(exc: BaseException) -> bool:
        """MemoryError, torch's OutOfMemoryError (any module), or a RuntimeError with an allocator's message;
        also when one of these is the direct cause of `exc`."""
        for e in (exc, exc.__cause__):
            if e is None:
                continue
            if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
                return True
            if isinstance(e, RuntimeError) and any(m in str(e).lower() for m in OOM_MARKERS):
                return True
        return False

    def check(self, run, step: int, peak_bytes, save) -> None:
        """After a completed step: over the limit -> save this step (unless already saved) and stop."""
        if self.over(peak_bytes):
            save_once(run, step, save)
            raise self.stop_error(run, step, peak_bytes)

    def stop_error(self, run, step: int, peak_bytes=None, oom: str = "") -> ForgeError:
        """The one-line stop: what happened, the checkpoint a resume starts from, and what to do."""
        limit = f"{human(self.limit)} ({self.source})" if self.limit else "no limit set"
        peak = f"measured peak {human(peak_bytes)}" if peak_bytes is not None else "peak not measured"
        what = (f"out of memory at step {step} ({oom}); {peak}, limit {limit}" if oom
                else f"{peak} at step {step} passed the memory limit {limit}")
        last = run.latest()
        where = (f"resume point: checkpoint of step {last[0]} ({last[1]})" if last
                 else "no checkpoint yet (a resume starts from step 0)")
        command = method(self.kind).command
        todo = f"free memory and resume with `forge {command} --resume {run.path}`"
        if self.source.startswith("memory.limit"):
            todo += " (add --set memory.limit=SIZE to raise the limit)"
        plan = f"forge memory --config {run.file('config.json')} --method {self.kind}"
        replan = (f"or re-plan with `{plan}` and start a new run with a smaller train.batch_size / "
                  "train.max_seq_len or --grad-checkpoint")
        return ForgeError(f"{what}; stopped - {where}. To go on: {todo}, {replan}")


def oom_summary(exc: BaseException, width: int = 160) -> str:
    """The first line of a framework's out-of-memory message, shortened for the one-line stop error."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= width else text[: width - 3] + "..."


def save_once(run, step: int, save) -> bool:
    """save(step) unless step is 0 (nothing trained yet) or the newest checkpoint already is this step."""
    latest = run.latest()
    if step <= 0 or (latest is not None and latest[0] == step):
        return False
    save(step)
    return True
