"""Which runs a server holds, under which names, and which base each one decodes on.

A run is served as it was trained: on its own base, with its own residual. Runs that share that residual exactly
(same base model, targets, layers, rank, init and quantization, and, for PiSSA, the same initial factors, as the
init cache gives every run of one base) share one copy of it in memory: a *group*. Their adapters are only their
factors, kept resident, and a request picks one by name. Runs whose residual differs need a base of their own (the
plan counts it). The base model itself is served on the first group: its PiSSA residual plus the initial factors,
or the plain LoRA base with the adapter switched off.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forge_core.adapters.formats import FORGE, forge_adapter_dir, read_json
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.models.sources import resolve_model

AUTO = "auto"  # the router's name in a request


@dataclass
class Served:
    """One name a request's `model` may hold."""

    name: str
    group: str  # the key of the base it decodes on
    cfg: ForgeConfig  # the run's training config (the base's: defaults with model.path)
    adapter_dir: str | None = None  # None: the base model itself
    weights: dict | None = None  # the adapter's factors {backend key: numpy}; None: the group's initial factors
    factors: dict | None = None  # PiSSA's initial factors (what the residual was cut with)
    system: str = ""  # the system prompt every training row shared (used where a request brings none)


@dataclass
class Catalog:
    base_name: str
    served: dict[str, Served] = field(default_factory=dict)

    def groups(self) -> dict[str, list[Served]]:
        out: dict[str, list[Served]] = {}
        for s in self.served.values():
            out.setdefault(s.group, []).append(s)
        return out

    def names(self) -> list[str]:
        return list(self.served)


def lanes(key: str, members: list[Served], per_row: bool) -> dict[str, str]:
    """Each member's lane, the batch its requests decode in (forge_core/serve/scheduler.py): the group's, `key`, when
    its adapters are applied per row, else the member's own."""
    return {m.name: key if per_row else m.name for m in members}


def serving_line(members: list[Served], per_row: bool) -> str:
    """The engine's start-up line for one group."""
    how = "per row" if per_row else "one adapter per step" if len(members) > 1 else ""
    return (f"serving {', '.join(m.name for m in members)} on one base ({members[0].cfg.model.path})"
            + (f", adapters applied {how}" if how else ""))


def base_name(model_spec: str) -> str:
    """A base's name in requests: a hub id as typed, a directory or file by its name."""
    p = Path(model_spec)
    return model_spec if not p.exists() and "/" in model_spec else p.stem if p.suffix == ".gguf" else p.name


def _digest(factors: dict | None) -> str:
    if not factors:
        return ""
    h = hashlib.sha256()
    for k in sorted(factors):
        for a in (factors[k] if isinstance(factors[k], (tuple, list)) else [factors[k]]):
            h.update(k.encode())
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def group_key(cfg: ForgeConfig, factors: dict | None) -> str:
    """Runs with one key hold bit-identical bases (the residual and every other frozen weight)."""
    lo, q = cfg.lora, cfg.quant
    return json.dumps({"model": str(resolve_model(cfg.model.path)), "dtype": cfg.model.dtype,
                       "targets": sorted(lo.targets), "layers": lo.layers, "rank": lo.rank, "init": lo.init,
                       "dora": lo.dora, "bits": q.bits, "group": q.group_size, "mode": q.mode,
                       "embeddings": q.embeddings, "factors": _digest(factors)}, sort_keys=True)


def run_name(path: str) -> str:
    """A run dir's name (runs/demo-sft -> demo-sft); an adapter dir inside a run is named by the run."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "adapter" else p.name


def build_catalog(ops, runs: list[str], model: str | None) -> Catalog:
    """The served names: each run (dir or adapter dir) under its run name, and the base. `model` overrides the base
    of every run (as `forge generate --model` does); with no run it is the base served alone."""
    served: dict[str, Served] = {}
    first_cfg = None
    for path in runs:
        if not Path(path).exists():
            raise ForgeError(f"{path}: no such run or adapter dir")
        cfg, weights, factors = ops.load_adapter_dir(path)
        if model:
            cfg.model.path = model
        name = run_name(path)
        if name in served or name == AUTO:
            raise ForgeError(f"{path}: a served run is already named '{name}' (runs are served by their dir name; "
                             "rename one)")
        system = read_json(forge_adapter_dir(path) / FORGE).get("system_prompt", "")
        served[name] = Served(name, group_key(cfg, factors), cfg, str(path), weights, factors, system)
        first_cfg = first_cfg or cfg
    base_cfg = ForgeConfig()
    if first_cfg is not None:
        base_cfg = first_cfg
    elif model:
        base_cfg.model.path = model
    name = base_name(base_cfg.model.path)
    if name in served or name == AUTO:
        raise ForgeError(f"the base model's name '{name}' is also a run's; rename the run dir")
    first = next(iter(served.values()), None)
    served = {name: Served(name, first.group if first else "base", base_cfg, factors=first.factors if first else None),
              **served}
    return Catalog(name, served)
