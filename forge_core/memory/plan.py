"""The memory planner: estimate a run's peak, compare it with the device, say what to change.

    plan_memory(cfg, model_config, kind, backend) -> MemoryPlan     components, total, budget, verdict
    memory_command(cfg, as_json, kind)                               `forge memory`
    check_before_launch(cfg, kind, backend, model_config, force)     refuse over budget unless --force

The arithmetic lives in estimate.py (pure; its measured constants in constants.py), the device budget in
budget.py, the data's shape in data_shape.py, the runtime check in guard.py. Every
suggestion is a config change whose estimate was recomputed, never a rule of thumb.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from forge_core.config import ForgeConfig
from forge_core.config_parse import set_value
from forge_core.errors import ForgeError
from forge_core.memory.budget import device_budget, human, parse_size, plans_for_gpu  # noqa: F401  (parse_size: public API)
from forge_core.memory.estimate import (
    Component,
    ModelShape,
    compute_bytes,
    estimate,
    init_cache_disk_bytes,
    make_run,
    peak_bytes,
    phase_total,
)
from forge_core.models.known import load_model_config

TIGHT = 0.9  # "tight": above 90% of the allowed fraction (threshold x budget), still allowed


@dataclass
class Suggestion:
    change: dict  # {config key: new value}
    total_bytes: int

    def label(self) -> str:
        return " ".join(f"--set {k}={_yaml(v)}" for k, v in self.change.items())


@dataclass
class MemoryPlan:
    components: list[Component]
    total_bytes: int
    budget_bytes: int
    budget_source: str
    threshold: float
    verdict: str  # fits | tight | over
    suggestions: list[Suggestion] = field(default_factory=list)
    context: dict = field(default_factory=dict)  # model, kind, backend, on_gpu, compute dtype

    @property
    def limit_bytes(self) -> int:
        return int(self.threshold * self.budget_bytes)

    def component(self, name: str) -> int:
        """Bytes of one named component (for calibration against a measured peak)."""
        return sum(c.bytes for c in self.components if c.name == name)

    def phase_bytes(self, phase: str) -> int:
        return phase_total(self.components, phase)

    def to_dict(self) -> dict:
        return {**self.context, "components": [asdict(c) for c in self.components],
                "train_bytes": self.phase_bytes("train"), "init_bytes": self.phase_bytes("init"),
                "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes,
                "budget_source": self.budget_source, "threshold": self.threshold, "verdict": self.verdict,
                "suggestions": [{"change": s.change, "total_bytes": s.total_bytes} for s in self.suggestions]}


def _yaml(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def verdict(total: int, budget: int, threshold: float) -> str:
    """over: above threshold x budget; tight: above TIGHT of that; fits otherwise."""
    limit = threshold * budget
    return "over" if total > limit else "tight" if total > TIGHT * limit else "fits"


# ------------------------------------------------------------------------------------------- suggestions

def _candidates(cfg: ForgeConfig) -> list[list[dict]]:
    """Per knob, the changes to try, least disruptive first. Knobs are ordered best first:
    checkpointing (same result, ~30% slower), smaller micro-batch with more accumulation (same
    effective batch, slower), 4-bit base (small quality cost), lower rank, shorter sequences (truncates)."""
    t, knobs = cfg.train, []
    if not t.grad_checkpoint:
        knobs.append([{"train.grad_checkpoint": True}])
    divisors = [d for d in range(t.batch_size - 1, 0, -1) if t.batch_size % d == 0]
    knobs.append([{"train.batch_size": d, "train.grad_accum": t.grad_accum * (t.batch_size // d)} for d in divisors])
    if cfg.quant.bits == 0 or cfg.quant.bits > 4:
        knobs.append([{"quant.bits": 4}])
    ranks, r = [], cfg.lora.rank // 2
    while r >= 4:
        ranks.append(r)
        r //= 2
    knobs.append([{"lora.rank": r} for r in ranks])
    seqs, s = [], t.max_seq_len // 2
    while s >= 128:
        seqs.append(s)
        s //= 2
    knobs.append([{"train.max_seq_len": s} for s in seqs])
    return [k for k in knobs if k]


def _with(cfg: ForgeConfig, change: dict) -> ForgeConfig:
    new = copy.deepcopy(cfg)
    for key, value in change.items():
        set_value(new, key, value)
    return new


def suggestions(cfg: ForgeConfig, total_of, limit: float) -> list[Suggestion]:
    """Changes that bring total_of(cfg) under `limit`, each with its recomputed total, best first:
    the greedy combination of the better knobs (when it is not just one of the single changes), then
    every single change that fits on its own."""
    knobs = _candidates(cfg)
    singles = []
    for options in knobs:
        for change in options:
            total = total_of(_with(cfg, change))
            if total <= limit:
                singles.append(Suggestion(change, total))
                break
    combo = _combined(cfg, knobs, total_of, limit)
    if combo is not None and all(s.change != combo.change for s in singles):
        return [combo] + singles
    return singles


def _combined(cfg: ForgeConfig, knobs: list[list[dict]], total_of, limit: float) -> Suggestion | None:
    """Knobs applied best first (each at its mildest setting that fits, else its strongest) until the
    total fits; then every knob the result does not need is dropped again. None if nothing fits."""
    def fits(change: dict) -> bool:
        return total_of(_with(cfg, change)) <= limit

    combined: dict = {}
    for options in knobs:
        combined = next(({**combined, **c} for c in options if fits({**combined, **c})), {**combined, **options[-1]})
        if fits(combined):
            break
    if not fits(combined):
        return None
    for options in knobs:
        trial = {k: v for k, v in combined.items() if k not in options[0]}
        if trial != combined and fits(trial):
            combined = trial
    return Suggestion(combined, total_of(_with(cfg, combined)))


# ------------------------------------------------------------------------------------------- plan

def plan_memory(cfg: ForgeConfig, model_config: dict, kind: str = "sft", backend: str = "mlx",
                on_gpu: bool | None = None, nproc: int = 1, shared: bool = True, data=None,
                process_bytes: int = 0) -> MemoryPlan:
    """Estimate, budget, verdict, and (when over) the changes that fit - for ONE process.

    nproc > 1: that many data-parallel processes; `shared`: they share this machine's device (one Mac's
    unified memory, the CPU's RAM), so each is held to 1/nproc of the budget. Not shared: one GPU per rank,
    or --device-memory (the size of each rank's own device). data: the DataShape of the run's rows
    (memory/data_shape.py); None plans the worst case, every row max_seq_len long.
    """
    gpu = plans_for_gpu(backend, cfg) if on_gpu is None else on_gpu
    shape = ModelShape.from_config(model_config)

    def total_of(c: ForgeConfig) -> int:  # a suggestion's max_seq_len also cuts the data's rows
        d = data and dataclasses.replace(data, seq=min(data.seq, c.train.max_seq_len),
                                         head_per_row=min(data.head_per_row, c.train.max_seq_len))
        return peak_bytes(estimate(c, shape, kind, backend, gpu, nproc, d, process_bytes))

    components = estimate(cfg, shape, kind, backend, gpu, nproc, data, process_bytes)
    total = peak_bytes(components)
    budget, source = device_budget(backend, cfg)
    if nproc > 1 and shared and not cfg.memory.device_memory:
        budget, source = budget // nproc, f"{source} / {nproc} processes on this machine"
    threshold = cfg.memory.threshold
    if not 0 < threshold <= 1:
        raise ForgeError(f"memory.threshold: {threshold} must be a fraction in (0, 1], e.g. 0.8")
    result = verdict(total, budget, threshold)
    dtype = {4: "float32", 2: "float16" if cfg.model.dtype == "float16" else "bfloat16"}[
        compute_bytes(cfg.model.dtype, gpu)]
    context = {"model": cfg.model.path, "kind": kind, "backend": backend, "on_gpu": gpu, "compute_dtype": dtype,
               "nproc": nproc, "rows": data.source if data else None,
               "seq": data.seq if data else cfg.train.max_seq_len,
               "init_cache_disk_bytes": init_cache_disk_bytes(make_run(cfg, shape, kind, backend, gpu))}
    plan = MemoryPlan(components, total, budget, source, threshold, result, context=context)
    if result == "over":
        plan.suggestions = suggestions(cfg, total_of, threshold * budget)
    return plan


def runtime_limit_bytes(plan: MemoryPlan) -> int:
    """The budget: backends pass it to mx.set_memory_limit / compare torch's peak with it."""
    return int(plan.budget_bytes)


def summary(plan: MemoryPlan) -> str:
    pct = 100 * plan.total_bytes / max(plan.budget_bytes, 1)
    overhead = plan.component("framework overhead")
    basis = (f"from the data: batches up to {plan.context['seq']} tokens" if plan.context.get("rows")
             else f"assumes rows of max_seq_len {plan.context['seq']}")
    return (f"memory: planned peak {human(plan.total_bytes)} (arrays {human(plan.total_bytes - overhead)} + "
            f"framework {human(overhead)}; {basis}) of {human(plan.budget_bytes)} ({plan.budget_source}), "
            f"{pct:.0f}% - {plan.verdict}")


def over_message(plan: MemoryPlan) -> str:
    """The refusal: the verdict, why, and the best fixes, as ONE line (parts joined with '; ')."""
    parts = [(f"memory: planned peak {human(plan.total_bytes)} is over {plan.threshold:.0%} of "
              f"{human(plan.budget_bytes)} ({plan.budget_source})")]
    if plan.phase_bytes("init") > plan.phase_bytes("train"):
        big = max((c for c in plan.components if c.phase == "init"), key=lambda c: c.bytes)
        parts.append(f"the peak is the model build ({human(plan.phase_bytes('init'))}, of which {big.name} "
                     f"{human(big.bytes)}); training itself needs {human(plan.phase_bytes('train'))}")
    for s in plan.suggestions[:3]:
        parts.append(f"fits with {s.label()} ({human(s.total_bytes)})")
    if not plan.suggestions:
        parts.append(no_fit_advice(plan))
    parts.append("run `forge memory` with the same options for the breakdown, or pass --force to launch anyway")
    return "; ".join(parts)


def no_fit_advice(plan: MemoryPlan) -> str:
    """What to do when no change of the run's own settings fits: when the frozen weights alone are over the limit,
    say so (a mixture of experts stores every expert) and how big a device it needs."""
    weights = plan.component("base weights (blocks)") + plan.component("embeddings / lm_head")
    if weights <= plan.limit_bytes:
        return "no single config change fits this device; use a smaller model or a bigger device"
    note = next((c.note for c in plan.components if c.name == "base weights (blocks)"), "")
    moe = " (every expert is stored, routed to or not)" if "MoE" in note else ""
    return (f"the frozen weights alone are {human(weights)}{moe}, over the limit whatever the batch, rank or "
            f"sequence length: this model needs a device of at least {human(plan.total_bytes / plan.threshold)} "
            "as configured")


def check_before_launch(cfg: ForgeConfig, kind: str, backend: str, model_config: dict, force: bool,
                        console=None, nproc: int = 1, shared: bool = True, data=None,
                        process_bytes: int = 0) -> MemoryPlan:
    """Print the one-line plan; over budget: raise ForgeError (the verdict and fixes), unless force.
    Under a launcher every rank runs this with the number of ranks on its machine, and all refuse alike.
    process_bytes: this process's resident memory now (launch measures it), the plan's overhead on the CPU."""
    plan = plan_memory(cfg, model_config, kind=kind, backend=backend, nproc=nproc, shared=shared, data=data,
                       process_bytes=process_bytes)
    _say(console, summary(plan))
    if plan.verdict == "over":
        if not force:
            raise ForgeError(over_message(plan))
        _say(console, "memory: --force given, launching anyway")
    return plan


def _say(console, text: str) -> None:
    if console is None:
        import click

        click.echo(text, err=True)
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------- CLI

def _backend_name(name: str) -> str:
    """An explicit backend is planned as named (no framework needed); auto picks this machine's."""
    if name in ("mlx", "cuda"):
        return name
    from forge_core.backend import resolve

    return resolve(name)


def memory_command(cfg: ForgeConfig, as_json: bool = False, kind: str = "sft", nproc: int = 1) -> MemoryPlan:
    """`forge memory`: the table (or one JSON object) for this config on this (or the named) device;
    nproc > 1: one rank's plan when that many data-parallel processes run on it. With data (--data or the
    recipe's data.train) the plan is the data's, and the worst case is shown beside it."""
    backend = _backend_name(cfg.backend)
    model_config, source = load_model_config(cfg.model.path)
    worst = plan_memory(cfg, model_config, kind=kind, backend=backend, nproc=nproc)
    data, why = None, ""
    if cfg.data.train:
        try:  # the data is tokenized with the model's tokenizer: planning never downloads a model for it
            with _offline():
                data = data_shape_of(cfg, kind)
        except ForgeError as e:
            if not _model_missing(cfg):
                raise
            why = f"the data is not planned: the model's tokenizer is not on this machine ({str(e)[:120]})"
    plan = plan_memory(cfg, model_config, kind=kind, backend=backend, nproc=nproc, data=data) if data else worst
    if as_json:
        import click

        click.echo(json.dumps({**plan.to_dict(), "model_config_source": source,
                               "worst_case_total_bytes": worst.total_bytes, "data_not_planned": why or None}))
    else:
        _print_plan(plan, source, worst if data else None)
        if why:
            _say(None, why)
    return plan


@contextlib.contextmanager
def _offline():
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _model_missing(cfg: ForgeConfig) -> bool:
    """True when the model is a hub id with no local copy (the data problems are the user's to hear)."""
    from forge_core.models.sources import HUB_ID

    return bool(HUB_ID.match(str(cfg.model.path))) and not Path(cfg.model.path).exists()


def data_shape_of(cfg: ForgeConfig, kind: str):
    """The DataShape of the run's rows, tokenized with the model's own tokenizer (the objective reuses them)."""
    from forge_core.data.tokenize import load_tokenizer
    from forge_core.memory.data_shape import data_shape
    from forge_core.models.sources import resolve_model

    return data_shape(cfg, kind, load_tokenizer(resolve_model(cfg.model.path)))


def _print_plan(plan: MemoryPlan, source: str, worst: MemoryPlan | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    ctx = plan.context
    device = ("GPU" if ctx["on_gpu"] else "CPU") + f", {ctx['compute_dtype']}"
    basis = (f"planned from the data: {ctx['rows']}, widest batch {ctx['seq']} tokens" if ctx.get("rows")
             else f"no data given: assumes rows of max_seq_len ({ctx['seq']}), trained at every position")
    table = Table(title=f"memory plan: {ctx['model']} ({ctx['kind']}, {ctx['backend']} {device})",
                  caption=f"shapes from {source}; {basis}")
    table.add_column("component")
    table.add_column("when")
    table.add_column("size", justify="right")
    table.add_column("note")
    for c in plan.components:
        table.add_row(c.name, {"both": "always"}.get(c.phase, c.phase), human(c.bytes), c.note)
    console = Console()
    if not console.is_terminal:  # pipes and CliRunner: do not squeeze the notes into 80 columns
        console = Console(width=120)
    console.print(table)
    console.print(f"training peak {human(plan.phase_bytes('train'))}, model build peak "
                  f"{human(plan.phase_bytes('init'))} -> planned peak [bold]{human(plan.total_bytes)}[/bold]")
    if worst is not None:
        console.print(f"worst case (every row max_seq_len {worst.context['seq']}, trained at every position): "
                      f"{human(worst.total_bytes)}", markup=False, highlight=False)
    if ctx.get("init_cache_disk_bytes"):
        console.print(f"disk: the init cache entry (PiSSA factors, written once per base; `forge cache ls`) "
                      f"{human(ctx['init_cache_disk_bytes'])}", markup=False, highlight=False)
    console.print(f"budget {human(plan.budget_bytes)} ({plan.budget_source}); limit {plan.threshold:.0%} = "
                  f"{human(plan.limit_bytes)}")
    style = {"fits": "green", "tight": "yellow", "over": "red"}[plan.verdict]
    pct = 100 * plan.total_bytes / max(plan.budget_bytes, 1)
    console.print(f"verdict: [{style}]{plan.verdict}[/{style}] ({pct:.0f}% of the budget)")
    if plan.verdict == "over":
        if plan.phase_bytes("init") > plan.limit_bytes >= plan.phase_bytes("train"):
            console.print(f"training fits ({human(plan.phase_bytes('train'))}); the model build does not "
                          f"({human(plan.phase_bytes('init'))}, the init rows)", markup=False, highlight=False)
        if plan.suggestions:
            console.print("changes that fit (best first):")
            for s in plan.suggestions:
                console.print(f"  {s.label()}  -> {human(s.total_bytes)}", markup=False, highlight=False)
        else:
            console.print(no_fit_advice(plan))
