"""The framework-free parts of the training loop that both backends share.

Everything here is plain Python/numpy: the data position of an objective, the log line, the
non-finite-loss stop, the memory guard (peak over the limit / out-of-memory -> a clean stop with a
checkpoint), which linears get adapters, generation-based task metrics.
"""

from __future__ import annotations

import copy
from pathlib import Path

from forge_core import data as fdata
from forge_core.config import DEFAULT_TARGETS, ForgeConfig, layer_indices
from forge_core.errors import ForgeError
from forge_core.progress import human_bytes


class ObjectiveBase:
    """Rows + a resumable, seeded batch order. Backends subclass it with their loss and batches."""

    kind = ""

    def __init__(self, cfg: ForgeConfig, rows: list):
        self.cfg, self.rows = cfg, rows
        self.n_rows = len(rows)
        self.order = fdata.BatchOrder(len(rows), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)

    def state(self) -> dict:
        return self.order.state()

    def restore(self, state: dict | None) -> None:
        if state:
            self.order = fdata.BatchOrder.from_state(self.n_rows, self.cfg.train.batch_size, state)

    def epoch(self) -> float:
        return float(self.order.epoch)


def eval_batch_starts(n: int, size: int, limit: int) -> list[int]:
    """Start indices of the validation batches (all, or the first `limit`)."""
    starts = list(range(0, n, size))
    return starts[:limit] if limit else starts


def report_data(console, path, stats) -> None:
    msg = f"{path}: {stats.rows} rows"
    if stats.truncated:
        msg += f", {stats.truncated} truncated to max_seq_len"
    if stats.skipped:
        msg += f", {stats.skipped} skipped ({'; '.join(stats.reasons[:3])})"
    console.print(msg)


def log_line(rec: dict) -> str:
    """One metrics record as a readable line (used when no live progress bar is shown)."""
    parts = [f"{rec['split']} step {rec['step']}"]
    for k, v in rec.items():
        if k in ("split", "step") or not isinstance(v, (int, float)):
            continue
        if k == "peak_memory":
            parts.append(f"peak {human_bytes(v)}")
        elif k == "tok_s":
            parts.append(f"{v:.0f} tok/s")
        else:
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)


def nonfinite_loss(run, loss: float, step: int) -> ForgeError:
    """The error a NaN/inf loss stops the run with; the last good checkpoint stays in place."""
    last = run.latest()
    where = f"last good checkpoint: step {last[0]} ({last[1]})" if last else "no checkpoint was saved yet"
    return ForgeError(f"loss became {loss} at step {step}; stopped - {where}. Lower train.lr or check the data.")


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
        from forge_core.memory.budget import parse_size

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
        limit = f"{human_bytes(self.limit)} ({self.source})" if self.limit else "no limit set"
        peak = f"measured peak {human_bytes(peak_bytes)}" if peak_bytes is not None else "peak not measured"
        what = (f"out of memory at step {step} ({oom}); {peak}, limit {limit}" if oom
                else f"{peak} at step {step} passed the memory limit {limit}")
        last = run.latest()
        where = (f"resume point: checkpoint of step {last[0]} ({last[1]})" if last
                 else "no checkpoint yet (a resume starts from step 0)")
        command = "dpo" if self.kind == "dpo" else "train"
        todo = f"free memory and resume with `forge {command} --resume {run.path}`"
        if self.source.startswith("memory.limit"):
            todo += " (add --set memory.limit=SIZE to raise the limit)"
        plan = f"forge memory --config {run.file('config.json')}" + (" --dpo" if command == "dpo" else "")
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


def resumed_config(run, cfg: ForgeConfig) -> ForgeConfig:
    """The config a resume runs with: the run's saved config, except memory.* - how much memory this
    machine may use now (the planner's device and threshold, the runtime limit) - which comes from `cfg`,
    the config of this invocation. So `--resume RUN --set memory.limit=8GB` raises a limit that stopped it."""
    from forge_core.config import from_dict

    saved = from_dict(run.load_config())
    saved.memory = copy.deepcopy(cfg.memory)
    return saved


def select_targets(linear_paths: list[str], cfg: ForgeConfig, num_blocks: int) -> list[str]:
    """The linears to adapt: `...layers.N....<target>` in the chosen blocks, in natural order."""
    chosen = set(layer_indices(cfg.lora.layers, num_blocks))
    targets = cfg.lora.targets or DEFAULT_TARGETS
    all_linear = "all-linear" in targets
    paths = []
    for path in linear_paths:
        parts = path.split(".")
        if "layers" not in parts[:-1]:
            continue
        block = int(parts[parts.index("layers") + 1])
        if block in chosen and (all_linear or parts[-1] in targets):
            paths.append(path)
    if not paths:
        names = sorted({p.split(".")[-1] for p in linear_paths})
        raise ForgeError(f"lora.targets {targets} matched no linear layer in the chosen blocks "
                         f"(names look like {', '.join(names[:10])})")
    return sorted(paths, key=lambda p: [int(s) if s.isdigit() else s for s in p.split(".")])


def forge_adapter_dir(path) -> Path:
    """Accept a run dir (its adapter/) or a forge adapter dir."""
    path = Path(path)
    if (path / "adapter" / "forge.json").is_file():
        return path / "adapter"
    if (path / "forge.json").is_file():
        return path
    raise ForgeError(f"{path}: not a forge adapter or run dir (no forge.json); "
                     "use `forge convert` to bring a foreign adapter in")


def task_metrics(cfg: ForgeConfig, path, complete) -> dict:
    """Greedy answers to the held-out prompts, scored against the references (forge_core.metrics).

    `complete(messages) -> str` is the backend's generator.
    """
    from forge_core.data.eval_rows import prompts_and_references
    from forge_core.metrics import score_rows

    if cfg.eval.metric == "none":
        return {}
    pairs = prompts_and_references(path, cfg.data)
    if cfg.eval.limit:
        pairs = pairs[: cfg.eval.limit]
    preds = [complete(msgs) for msgs, _ in pairs]
    return {**score_rows(preds, [ref for _, ref in pairs], metric=cfg.eval.metric), "examples": len(pairs)}


def log_due(step: int, start: int, steps: int, log_every: int) -> bool:
    """Log the first step of a (resumed) run, every `log_every`, and the last."""
    return step % log_every == 0 or step == steps or step == start + 1


def report_train(run, bar, console, rec: dict) -> None:
    """A train record to metrics.jsonl and the progress bar (a plain line when no live bar is shown)."""
    run.log(rec)
    bar.update(rec["step"], rec["loss"], rec["tok_s"], rec["peak_memory"], record=rec)
    if not bar.progress.live.is_started or bar.progress.disable:
        console.print(log_line(rec), soft_wrap=True)


def end_of_step(t, step: int, steps: int, stop_at, run, console, obj, back_to_train, save) -> bool:
    """Evaluate and checkpoint when due; True when the run stops here (`stop_at`, as a kill would).

    `back_to_train()` puts the model back in training mode after an eval; `save(step)` writes the checkpoint.
    """
    if (t.eval_every and step % t.eval_every == 0) or step == steps:
        rec = {"split": "valid", "step": step, **obj.evaluate()}
        if rec.get("loss") is not None:
            run.log(rec)
            console.print(log_line(rec), soft_wrap=True)
        back_to_train()
    if step % t.save_every == 0 or step == steps or step == stop_at:
        save(step)
    return step == stop_at
