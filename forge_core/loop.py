"""The framework-free parts of the training loop that both backends share.

Everything here is plain Python/numpy: the data position of an objective, the log line, the
non-finite-loss stop, which linears get adapters, generation-based task metrics.
"""

from __future__ import annotations

from pathlib import Path

from . import data as fdata
from .config import DEFAULT_TARGETS, ForgeConfig, layer_indices
from .errors import ForgeError
from .progress import human_bytes


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
    from .eval_rows import prompts_and_references
    from .metrics import score_rows

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
