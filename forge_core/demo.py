"""`forge demo` (make demo): fine-tune the bundled model on the demo task and show before vs after.

SFT recipe: held-out loss / perplexity and the task metric (valid JSON, exact match, field accuracy)
of the base model, then training, then the same numbers for base + adapter.
DPO recipe (continuing from the SFT demo adapter): held-out preference accuracy of the policy
(log π(chosen) > log π(rejected)) before vs after, and the reward accuracy / margin against the
reference. Results land in RUN/demo_results.json.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from forge_core import backend as backends
from forge_core.atomic import write_json
from forge_core.config import build_config
from forge_core.errors import ForgeError
from forge_core.evaluate import evaluate, evaluate_preferences
from forge_core.launch import launch
from forge_core.rundir import RunDir


def _table(title: str, before: dict, after: dict, keys: list[str]) -> Table:
    t = Table(title=title)
    t.add_column("held-out metric")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for k in keys:
        if k in before or k in after:
            t.add_row(k, _fmt(before.get(k)), _fmt(after.get(k)))
    return t


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def run_demo(recipe: str, sets=(), backend: str | None = None) -> dict:
    console = Console()
    cfg = build_config(recipe, sets, {"backend": backend})
    kind = "dpo" if "dpo" in Path(recipe).stem else "sft"
    name = backends.resolve(cfg.backend)
    ops = backends.ops(name)
    run_dir = Path(cfg.train.out_dir)
    if (run_dir / "latest.json").exists():
        raise ForgeError(f"{run_dir} holds an earlier demo run; remove it (rm -rf {run_dir}) to run the demo again")
    if kind == "dpo" and cfg.dpo.adapter and not Path(cfg.dpo.adapter).exists():
        raise ForgeError(f"the DPO demo continues from {cfg.dpo.adapter}: run `make demo-sft` first")
    t0 = time.perf_counter()
    console.rule(f"[bold]Forge demo: {kind.upper()} on {cfg.model.path} ({name} backend)")
    if kind == "sft":
        console.print("measuring the base model on the held-out set...")
        before = evaluate(ops, cfg, adapter=None, model_spec=cfg.model.path)
    else:
        console.print("measuring the starting policy (the SFT adapter) on the held-out pairs...")
        before = evaluate_preferences(ops, cfg, adapter=cfg.dpo.adapter)
        # before training the policy IS the reference: every reward is exactly 0 (accuracy counts r_w > r_l)
        before.update({"rewards/accuracy": 0.0, "rewards/margin": 0.0})
    launch(cfg, kind=kind)
    adapter = str(run_dir / "adapter")
    after = evaluate(ops, cfg, adapter=adapter) if kind == "sft" else evaluate_preferences(ops, cfg, adapter=adapter)
    keys = ["loss", "ppl", "valid_json", "exact", "field_acc"] if kind == "sft" else \
        ["pref_accuracy", "logp_margin", "rewards/accuracy", "rewards/margin", "loss"]
    if kind == "dpo":  # reward accuracy / margin against the reference, from the run's last eval
        last = [r for r in RunDir(run_dir).metrics() if r.get("split") == "valid"]
        if last:
            after.update({k: last[-1][k] for k in ("rewards/accuracy", "rewards/margin", "loss") if k in last[-1]})
    console.print(_table(f"{kind.upper()} demo: before vs after ({cfg.data.valid})", before, after, keys))
    result = {"kind": kind, "backend": name, "before": before, "after": after,
              "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir)}
    write_json(run_dir / "demo_results.json", result)
    console.print(f"run dir: {run_dir} (adapter/, metrics.jsonl, loss.png, demo_results.json) "
                  f"in {result['seconds']:.0f}s")
    return result
