"""`forge <command> --nproc N`: the backend's own launcher (mlx.launch with the ring backend, or torchrun) runs N
copies of the same command on this machine; each copy then runs launch() as one rank (forge_core/distributed.py).
Never a transport of forge's own.

This process stays as the launcher's parent, for what the launchers do not do: its exit code is the ranks'
(mlx.launch exits 0 whatever they did; rank_status.py), with the failing rank's one line; and Ctrl-C or SIGTERM
asks the ranks to stop politely after their step, with a checkpoint (stopping.py), through a file - the launcher
runs in a session of its own, so the terminal's Ctrl-C reaches only this process. A second signal kills them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile

from rich.console import Console

from forge_core import backend as backends
from forge_core import rank_status
from forge_core.errors import ForgeError
from forge_core.stopping import STOP_FILE_ENV, StopRequest, signal_name


def free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free on this machine (mlx's ring backend listens on one port per rank, from a fixed
    one unless told - 32323 in mlx 0.32: two runs launched at once on one machine would take each other's)."""
    for _ in range(200):
        p = random.randint(20000, 32000)  # below Linux's ephemeral range, where outgoing connections take theirs
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ForgeError(f"--nproc {n}: found no {n} free consecutive ports on 127.0.0.1 for mlx.launch's ring backend")


def launcher_command(nproc: int, backend: str, argv: list[str], port: int | None = None) -> list[str]:
    """`forge train --nproc N ...` as the backend's own launcher runs it on this machine: mlx.launch with the
    ring backend, or torchrun (gloo on the CPU, nccl on GPUs), each process running `forge <argv>`. Without
    `port`, mlx.launch gets free ones (torchrun --standalone finds its own)."""
    forge = [sys.executable, "-m", "forge_core.cli", *argv]
    if backend == "mlx":
        # each rank sizes its BLAS pool to its share of the cores itself (forge_mlx/blas.py), also when the user
        # runs mlx.launch directly
        ring = ["--backend", "ring", "--starting-port", str(port or free_ports(nproc))]
        return [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()", "-n", str(nproc),
                *ring, "--", *forge]
    rdzv = [f"--master-port={port}"] if port else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *rdzv,
            "-m", "forge_core.cli", *argv]


def under_launcher() -> bool:
    return any(os.environ.get(k) for k in ("MLX_RANK", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK"))


def relaunch(nproc: int, backend: str, argv: list[str]) -> None:
    """Run `nproc` copies of `forge <argv>` (argv without --nproc) under the launcher; exit as they did."""
    if under_launcher():
        raise ForgeError("--nproc: this process already runs under a launcher; drop --nproc")
    name = backends.resolve(backend)
    say = Console(stderr=True, soft_wrap=True)
    say.print(f"launching {nproc} data-parallel processes with {'mlx.launch (ring)' if name == 'mlx' else 'torchrun'}",
              markup=False, highlight=False)
    with tempfile.TemporaryDirectory(prefix="forge-ranks-") as status:
        stop_file = os.path.join(status, "stop")
        env = {**os.environ, rank_status.STATUS_DIR_ENV: status, STOP_FILE_ENV: stop_file}
        proc = subprocess.Popen(launcher_command(nproc, name, argv), env=env, start_new_session=True)

        def ask_ranks_to_stop(signum: int) -> None:
            open(stop_file, "w").close()
            say.print(f"{signal_name(signum)}: the ranks stop after the step under way, with a checkpoint "
                      "(again: stop at once)", markup=False, highlight=False)

        with StopRequest(on_first=ask_ranks_to_stop):
            try:
                launcher_rc = proc.wait()
            except KeyboardInterrupt:  # the second signal: the launcher and its ranks, at once
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                launcher_rc = proc.wait()
        code, line = rank_status.verdict(rank_status.read(status, nproc), launcher_rc)
    if line:
        say.print(f"forge: error: {line}", markup=False, highlight=False)
    sys.exit(code)
