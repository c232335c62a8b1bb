"""What a training command (`forge train / dpo / grpo ...`) does between the CLI and a backend, given the resolved
config (forge_core/run_config.py). `--nproc N` re-launching: relaunch.py; `forge generate / eval`: eval/commands.py.

launch(): resolve the backend, check the memory plan (refuse when over budget unless --force),
then hand the config to the backend's trainer with the plan's budget as the runtime memory limit
(the allocator's cap, and the loop's MemoryGuard unless memory.limit says otherwise). Nothing here
imports a framework at module import.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from forge_core import backend as backends
from forge_core import train as train_module
from forge_core.config import ForgeConfig
from forge_core.data import sources
from forge_core.distributed import env_rank, local_ranks
from forge_core.errors import ForgeError
from forge_core.memory.budget import plans_for_gpu
from forge_core.memory.plan import check_before_launch, data_shape_of, runtime_limit_bytes
from forge_core.methods import method
from forge_core.models.sources import resolve_model
from forge_core.tracking import check_installed as check_trackers


def _check_data(cfg: ForgeConfig) -> None:
    if not cfg.data.train:
        raise ForgeError("no training data: pass --data FILE.jsonl (or set data.train in the recipe)")
    for key in ("train", "valid"):
        p = str(getattr(cfg.data, key) or "")
        if p and not Path(p).exists() and not sources.is_dataset(p) and not (
                key == "valid" and (sources.holdout_fraction(cfg.data) or sources.is_split_of_train(p, cfg.data))):
            also = ", a split of data.train or a held-out fraction like 0.05" if key == "valid" else ""
            raise ForgeError(f"data.{key}: {p} does not exist (nor is it a Hub dataset id like org/name{also})")


def _model_config(cfg: ForgeConfig) -> dict:
    return json.loads((Path(resolve_model(cfg.model.path)) / "config.json").read_text())


def memory_check(cfg: ForgeConfig, kind: str, name: str, force: bool, console: Console):
    """The pre-launch memory check; returns the plan (or None when the planner cannot size this model).
    Under a launcher: one rank's plan; ranks on this machine share its memory unless each has its own GPU."""
    import psutil

    own_gpu = name == "cuda" and plans_for_gpu(name, cfg)
    data = data_shape_of(cfg, kind)  # loads the tokenizer and reads the rows: the process is as it will train
    return check_before_launch(cfg, kind, name, _model_config(cfg), force, console=console, nproc=local_ranks(),
                               shared=not own_gpu, data=data, process_bytes=psutil.Process().memory_info().rss)


def launch(cfg: ForgeConfig, kind: str, resume: str | None = None, force: bool = False) -> Path:
    """`cfg`: resolved (forge_core/run_config.py), so this and the loop only read it."""
    console = Console(stderr=True, soft_wrap=True, quiet=env_rank() != 0)  # under a launcher rank 0 speaks for all
    _check_data(cfg)
    method(kind).run_checks(cfg)  # e.g. a GRPO reward that cannot load stops the launch before the model is built
    check_trackers(cfg.train.report_to)
    name = backends.resolve(cfg.backend)
    ops = backends.ops(name)
    ops.init_world()  # join the launcher's group first: a CUDA rank then plans and caps its own GPU
    plan = memory_check(cfg, kind, name, force, console)
    limit = 0
    if plan is not None:  # None: the planner cannot size this model - no budget to hold it to
        limit = runtime_limit_bytes(plan)
        ops.set_memory_limit(limit)  # the allocator's cap, and below the loop's guard (unless memory.limit)
    return train_module.train(cfg, kind, ops=ops, resume=resume, console=console, memory_limit=limit)
