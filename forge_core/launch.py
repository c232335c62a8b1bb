"""What `forge train / dpo / generate / eval` do between the CLI and a backend.

launch(): resolve the backend, check the memory plan (refuse when over budget unless --force),
then hand the config to the backend's trainer with the plan's budget as the runtime memory limit
(the allocator's cap, and the loop's MemoryGuard unless memory.limit says otherwise). Nothing here
imports a framework at module import.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rich.console import Console

from forge_core import backend as backends
from forge_core import train as train_module
from forge_core.config import ForgeConfig
from forge_core.distributed import env_rank, local_ranks
from forge_core.errors import ForgeError
from forge_core.eval.evaluate import evaluate, generate, recorded_system_prompt
from forge_core.memory.budget import plans_for_gpu
from forge_core.memory.plan import check_before_launch, data_shape_of, runtime_limit_bytes
from forge_core.methods import method
from forge_core.models.sources import resolve_model
from forge_core.tracking import check_installed as check_trackers


def _check_data(cfg: ForgeConfig) -> None:
    if not cfg.data.train:
        raise ForgeError("no training data: pass --data FILE.jsonl (or set data.train in the recipe)")
    for key in ("train", "valid"):
        p = getattr(cfg.data, key)
        if p and not Path(p).exists():
            raise ForgeError(f"data.{key}: {p} does not exist")


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


def launcher_command(nproc: int, backend: str, argv: list[str], port: int | None = None) -> list[str]:
    """`forge train --nproc N ...` as the backend's own launcher runs it on this machine: mlx.launch with the
    ring backend, or torchrun (gloo on the CPU, nccl on GPUs), each process running `forge <argv>`."""
    forge = [sys.executable, "-m", "forge_core.cli", *argv]
    if backend == "mlx":
        ring = ["--backend", "ring"] + (["--starting-port", str(port)] if port else [])
        # the ranks share this machine's cores: one BLAS pool each, sized to its share (torchrun does the same
        # with OMP_NUM_THREADS=1), or two pools of spinning threads fight over every core
        if "OPENBLAS_NUM_THREADS" not in os.environ:
            ring += ["--env", f"OPENBLAS_NUM_THREADS={max(1, (os.cpu_count() or 1) // nproc)}"]
        return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", str(nproc),
                *ring, "--", *forge]
    rdzv = [f"--master-port={port}"] if port else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *rdzv,
            "-m", "forge_core.cli", *argv]


def under_launcher() -> bool:
    return any(os.environ.get(k) for k in ("MLX_RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK"))


def relaunch(nproc: int, backend: str, argv: list[str]) -> None:
    """Replace this process by the launcher running `nproc` copies of `forge <argv>` (argv without --nproc)."""
    if under_launcher():
        raise ForgeError("--nproc: this process already runs under a launcher; drop --nproc")
    name = backends.resolve(backend)
    Console(stderr=True).print(f"launching {nproc} data-parallel processes with "
                               f"{'mlx.launch (ring)' if name == 'mlx' else 'torchrun'}", markup=False, highlight=False)
    os.execv(sys.executable, launcher_command(nproc, name, argv))


def run_generate(model=None, adapter=None, prompt="", system=None, max_tokens=None, temp=0.0, backend=None) -> str:
    cfg = ForgeConfig()
    name = backends.resolve(backend or "auto")
    return generate(backends.ops(name), model=model, adapter=adapter, prompt=prompt, system=system,
                        max_tokens=max_tokens or cfg.eval.max_new_tokens, temp=temp)


def run_eval(cfg: ForgeConfig, adapter: str | None = None, as_json: bool = False, system: str | None = None) -> dict:
    if not (cfg.data.valid or cfg.data.train or cfg.eval.text or cfg.eval.lm_eval):
        raise ForgeError("nothing to evaluate: pass --valid FILE.jsonl (or --data), --text FILE or --lm-eval TASKS")
    name = backends.resolve(cfg.backend)
    recorded = recorded_system_prompt(adapter) if system is None and not cfg.data.system_prompt else ""
    if recorded:
        print(f"system prompt (the run's, for rows without one; --system '' for none): {recorded}", file=sys.stderr)
    result = evaluate(backends.ops(name), cfg, adapter=adapter, system=system)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        from rich.table import Table

        table = Table(title=f"eval: {adapter or cfg.model.path}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
        Console().print(table)
    return result
