"""`forge demo` (make demo): fine-tune the bundled model on the demo task and show before vs after.

SFT recipe: held-out loss / perplexity and the task metric (valid JSON, exact match, field accuracy)
of the base model, then training, then the same numbers for base + adapter.
GRPO recipe (grpo_demo.yaml, from the SFT demo adapter): the task metric of greedy answers to the held-out prompts
before and after, the reward being field accuracy against each prompt's reference.
Preference recipes (dpo_demo.yaml continues from the SFT demo adapter; orpo_ / simpo_ / cpo_ / kto_demo.yaml
start from the base): on the held-out pairs, how often the policy prefers chosen (log π(y_w) > log π(y_l)), the
implicit reward against the starting policy (the same yardstick for every method), the JSON task metric of
greedy answers to the pairs' prompts, and the method's own held-out metrics from the run's last eval; seconds
per step and peak memory from the run's records. Results land in RUN/demo_results.json.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from forge_core import backend as backends
from forge_core.atomic import write_json
from forge_core.errors import ForgeError
from forge_core.eval.evaluate import evaluate, evaluate_preferences, implicit_rewards
from forge_core.launch import launch
from forge_core.memory.budget import human
from forge_core.memory.plan import data_shape_of, plan_memory
from forge_core.methods import KINDS, method, start_adapter
from forge_core.models.known import load_model_config
from forge_core.run_config import resolve
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


def demo_kind(recipe: str) -> str:
    """The method a demo recipe runs, from its file name: dpo_demo.yaml -> dpo, demo.yaml -> sft."""
    head = Path(recipe).stem.split("_")[0]
    return head if head in KINDS else "sft"


def _planned_arrays(cfg, kind: str, backend: str) -> int | None:
    """The plan launch printed, less its framework constant: what the run's peak_memory measures."""
    try:
        model_config, _ = load_model_config(cfg.model.path)
        plan = plan_memory(cfg, model_config, kind=kind, backend=backend, data=data_shape_of(cfg, kind))
    except ForgeError:
        return None
    return plan.total_bytes - plan.component("framework overhead")


def run_demo(recipe: str, sets=(), backend: str | None = None) -> dict:
    console = Console()
    kind = demo_kind(recipe)
    cfg = resolve(kind, recipe, sets, {"backend": backend})
    name = backends.resolve(cfg.backend)
    ops = backends.ops(name)
    run_dir = Path(cfg.train.out_dir)
    if (run_dir / "latest.json").exists():
        raise ForgeError(f"{run_dir} holds an earlier demo run; remove it (rm -rf {run_dir}) to run the demo again")
    start = start_adapter(cfg, kind) or None
    if start and not Path(start).exists():
        raise ForgeError(f"the {kind.upper()} demo continues from {start}: run `make demo-sft` first")
    same = cfg.data.system_prompt  # before and after are asked the same way (not each with its own run's prompt)
    t0 = time.perf_counter()
    console.rule(f"[bold]Forge demo: {kind.upper()} on {cfg.model.path} ({name} backend)")
    rows = method(kind).rows  # what the method trains on says how before and after are measured
    if rows == "sft":
        console.print("measuring the base model on the held-out set...")
        before = evaluate(ops, cfg, adapter=None, model_spec=cfg.model.path, system=same)
    elif rows == "prompts":  # the reward's own yardstick: the task metric of greedy answers to the held-out prompts
        console.print(f"measuring the starting policy ({start or 'the base model'}) on the held-out prompts...")
        before = evaluate(ops, cfg, adapter=start, model_spec=None if start else cfg.model.path, system=same)
    else:
        console.print(f"measuring the starting policy ({start or 'the base model'}) on the held-out pairs...")
        before = evaluate_preferences(ops, cfg, adapter=start, with_task=True, system=same)
    launch(cfg, kind=kind)
    adapter = str(run_dir / "adapter")
    records = RunDir(run_dir).metrics()
    if rows == "sft":
        after = evaluate(ops, cfg, adapter=adapter, system=same)
        keys = ["loss", "ppl", "valid_json", "exact", "field_acc"]
    elif rows == "prompts":
        after = evaluate(ops, cfg, adapter=adapter, system=same)
        keys = ["valid_json", "exact", "field_acc", "strict"]
    else:
        after = evaluate_preferences(ops, cfg, adapter=adapter, with_task=True, system=same)
        after.update(implicit_rewards(before.pop("logps"), after.pop("logps")))
        before.update({"implicit_accuracy": 0.0, "implicit_margin": 0.0})  # the start against itself
        last = [r for r in records if r.get("split") == "valid"]
        if last:  # the method's own held-out numbers, from the run's last eval
            after.update({f"{kind} {k}": v for k, v in last[-1].items() if k not in ("split", "step")})
        keys = ["pref_accuracy", "logp_margin", "implicit_accuracy", "implicit_margin", "valid_json", "exact",
                "field_acc", *[k for k in after if k.startswith(f"{kind} ")]]
    train_recs = [r for r in records if r.get("split") == "train"]
    console.print(_table(f"{kind.upper()} demo: before vs after ({cfg.data.valid})", before, after, keys))
    planned = _planned_arrays(cfg, kind, name)
    peak = max((r["peak_memory"] for r in train_recs), default=None)
    if planned and peak:
        console.print(f"memory: the plan's arrays {human(planned)} (its total less the framework constant) vs the "
                      f"measured peak {human(peak)}: {planned / peak:.2f}x")
    result = {"kind": kind, "backend": name, "before": before, "after": after, "start": start or cfg.model.path,
              "seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir),
              "step_s": statistics.median(r["step_s"] for r in train_recs[1:] or train_recs) if train_recs else None,
              "peak_memory": peak, "planned_arrays": planned}
    write_json(run_dir / "demo_results.json", result)
    console.print(f"run dir: {run_dir} (adapter/, metrics.jsonl, loss.png, demo_results.json) "
                  f"in {result['seconds']:.0f}s")
    return result
