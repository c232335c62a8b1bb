"""`forge <command> --nproc N`: this process replaced by the backend's own launcher (mlx.launch with the ring
backend, or torchrun) running N copies of the same command on this machine; each copy then runs launch() as one
rank (forge_core/distributed.py). Never a transport of forge's own."""

from __future__ import annotations

import os
import sys

from rich.console import Console

from forge_core import backend as backends
from forge_core.errors import ForgeError


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
