"""The run directory: one layout for both backends.

    RUN/config.json                   the full ForgeConfig of the run (resume reads it back)
    RUN/metrics.jsonl                 one JSON object per logged step / eval
    RUN/loss.png                      training (and validation) loss curve
    RUN/pissa_init.safetensors        A0, B0 (PiSSA runs): the residual is rebuilt from them on resume
    RUN/reference_logps.safetensors   DPO: reference log-probs, computed once before training
    RUN/checkpoints/step_NNNNNN/      adapter weights, optimizer state, state.json (step, data order, ...)
    RUN/latest.json                   {"step": N, "dir": "checkpoints/step_NNNNNN"} - written last
    RUN/adapter/                      the final adapter (forge format; mlx-lm or PEFT layout per backend)

Every write is atomic: a run killed at any moment resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from forge_core.atomic import write_json, write_text
from forge_core.errors import ForgeError

KEEP_CHECKPOINTS = 2


class RunDir:
    def __init__(self, path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    def check_free(self) -> None:
        """A new run may start here: refuse a dir that already holds one (before anything is built or launched)."""
        if self.latest() is not None:
            raise ForgeError(f"{self.path} already holds a run; pass --resume {self.path} or choose another --out")

    # ---------------------------------------------------------------- config
    def save_config(self, cfg_dict: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.file("config.json"), cfg_dict)

    def load_config(self) -> dict:
        f = self.file("config.json")
        if not f.is_file():
            raise ForgeError(f"{self.path}: not a forge run dir (no config.json) - nothing to resume")
        return json.loads(f.read_text())

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.path / "checkpoints" / f"step_{step:06d}"

    def mark_latest(self, step: int) -> None:
        write_json(self.file("latest.json"), {"step": step, "dir": f"checkpoints/step_{step:06d}"})
        self._prune(step)

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint: latest.json's, or the newest step dir when that file is unreadable."""
        f = self.file("latest.json")
        if not f.is_file():
            return None
        try:
            info = json.loads(f.read_text())
            return int(info["step"]), self.path / info["dir"]
        except (ValueError, KeyError, TypeError):
            return next(iter(self.checkpoints()), None)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Every checkpoint dir on disk, newest first (a resume falls back along this list)."""
        found = []
        for d in (self.path / "checkpoints").glob("step_*"):
            if d.name[len("step_"):].isdigit():
                found.append((int(d.name[len("step_"):]), d))
        return sorted(found, reverse=True)

    def _prune(self, newest: int) -> None:
        ckpts = sorted((self.path / "checkpoints").glob("step_*"))
        keep = {self.checkpoint_dir(newest)} | set(ckpts[-KEEP_CHECKPOINTS:])
        for c in ckpts:
            if c not in keep:
                shutil.rmtree(c, ignore_errors=True)

    # ---------------------------------------------------------------- metrics
    def log(self, record: dict) -> None:
        with open(self.file("metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        f = self.file("metrics.jsonl")
        if not f.is_file():
            return []
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records logged after the checkpoint we resume from (they will be redone)."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        write_text(self.file("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))

    def plot(self, title: str = "") -> Path | None:
        """loss.png from metrics.jsonl: train and validation loss; for preference runs also the rewards and the
        method's own terms."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        recs = self.metrics()
        train = [(r["step"], r["loss"]) for r in recs if r.get("split") == "train" and _finite(r.get("loss"))]
        val = [(r["step"], r["loss"]) for r in recs if r.get("split") == "valid" and _finite(r.get("loss"))]
        if not train and not val:
            return None
        reward_keys = [k for k in ("rewards/accuracy", "rewards/margin", "reward") if any(k in r for r in recs)]
        rewards = [r for r in recs if any(k in r for k in reward_keys)]  # preference and GRPO runs: rewards
        terms = [k for k in OWN_TERMS if any(k in r for r in recs)]  # and the method's own terms
        panels = 1 + bool(rewards) + bool(terms)
        fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 1, 4), squeeze=False)
        ax = axes[0][0]
        if train:
            ax.plot(*zip(*train), label="train loss")
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_title(title or self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        if rewards:
            self._plot_series(axes[0][1], rewards, reward_keys, "rewards (train -, validation o-)")
        if terms:
            self._plot_series(axes[0][-1], recs, terms, "the method's own terms")
        out = self.file("loss.png")
        tmp = out.with_suffix(".tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(out)
        return out


    @staticmethod
    def _plot_series(ax, recs: list[dict], keys: list[str], title: str) -> None:
        for split, style in (("train", "-"), ("valid", "o-")):
            for key in keys:
                rows = [r for r in recs if r.get("split") == split and _finite(r.get(key))]
                if rows:
                    ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, label=f"{split} {key}")
        ax.set_xlabel("optimizer step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


# the preference methods' own logged terms, plotted beside the rewards (forge_core/losses)
OWN_TERMS = ("kl", "nll_loss", "log_odds_ratio", "log_odds_chosen")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def total_steps(train_cfg, n_rows: int, world_size: int = 1) -> int:
    """train.steps, or enough optimizer steps for train.epochs over n_rows (batch_size is per rank). An epoch is
    the data order's: its full micro-batches of batch_size x ranks rows (the rest of the rows wait for the next
    epoch's shuffle, data/batches.py BatchOrder), so the logged epoch at the end is train.epochs - or a little more
    when the micro-batches of an epoch are not a whole number of steps of grad_accum."""
    if train_cfg.steps > 0:
        return train_cfg.steps
    micro_batches = max(1, n_rows // (train_cfg.batch_size * world_size))
    return max(1, math.ceil(train_cfg.epochs * micro_batches / train_cfg.grad_accum))
