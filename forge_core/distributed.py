"""Data-parallel training on the engines users already run - never a transport of forge's own.

    mlx.launch -n 2 -- forge train ...                          MLX: mx.distributed (ring, MPI, ...)
    torchrun --nproc-per-node 2 --no-python forge train --backend cuda ...     torch.distributed (gloo, nccl)

The backend joins the launcher's group (ops.init_world) and provides sums over ranks (ops.all_sum for
framework arrays, ops.reduce_numpy for small numpy arrays). Everything else is decided here, once:

  - batches: train.batch_size is PER RANK. A global micro-batch is batch_size x world rows drawn from ONE
    seeded order (the single-process order at batch_size x world); rank r takes rows [r·B, (r+1)·B). A
    step is grad_accum global micro-batches: the global batch is batch_size x world x grad_accum rows,
    and the loss curve is the single-process one at that global batch.
  - gradients: each rank's gradients of its loss SUMS are summed over ranks, with the token (pair) counts,
    and divided by the global count - the stepper's one averaging point.
  - stops: every rank takes the same decision - the loss is the global one (non-finite everywhere or
    nowhere), the memory guard sees the largest peak of any rank, an out-of-memory error on one rank is
    agreed on before any gradient is exchanged, and a rank that loses its peers says so and exits.
  - writes: rank 0 alone writes the run dir (config, checkpoints, metrics, plots, the adapter); the other
    ranks read it (resume, PiSSA factors), so the run dir must be visible to every rank (one machine, or a
    shared filesystem across machines).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import numpy as np

from forge_core.errors import ForgeError

# Substrings (lower case) of the errors a collective raises when a peer process is gone: gloo
# ("Connection closed by peer", "Connection reset by peer", "Broken pipe"), NCCL ("remote process exited"),
# MLX's ring backend (send/recv failures on the closed socket).
PEER_LOST_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe", "remote process",
                     "[ring]", "recv failed", "send failed", "socket", "nccl error")


GRACE_S = 5.0  # how long a signalled rank may take to stop by itself before its watchdog ends it


class PeerLost(ForgeError):
    """This rank lost the others (one was killed, crashed or was stopped by the launcher)."""


def env_rank() -> int:
    """This process's rank as the launchers set it (torchrun: RANK, mlx.launch: MLX_RANK); 0 alone."""
    for key in ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def local_ranks() -> int:
    """How many ranks of this job run on this machine (they share its memory): torchrun's LOCAL_WORLD_SIZE,
    or the entries of mlx.launch's ring hostfile with this rank's address; 1 alone."""
    if os.environ.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(os.environ["LOCAL_WORLD_SIZE"])
    hostfile = os.environ.get("MLX_HOSTFILE", "")
    if hostfile and os.path.isfile(hostfile):
        import json

        try:
            hosts = [str(h[0]).rsplit(":", 1)[0] if isinstance(h, list) and h else "" for h in json.load(open(hostfile))]
        except (ValueError, OSError):
            return 1
        rank = env_rank()
        return hosts.count(hosts[rank]) if 0 <= rank < len(hosts) else 1
    return 1


def is_peer_lost(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, OSError, ConnectionError)) and any(m in text for m in PEER_LOST_MARKERS)


class World:
    """Which rank this process is, of how many, and the agreements the loop needs (no-ops alone)."""

    def __init__(self, ops=None, rank: int = 0, size: int = 1):
        self.ops = ops
        self.rank, self.size = (ops.init_world() if ops is not None else (rank, size))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: list, per_rank: int) -> list:
        """This rank's slice of a global micro-batch of per_rank x size rows."""
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def all_sum(self, tree):
        """The sum over ranks of a framework tree (arrays in lists / tuples / dicts), one buffer on the wire."""
        if self.size == 1:
            return tree
        leaves: list = []
        shape = _flatten(tree, leaves)
        return _rebuild(shape, iter(self.ops.all_sum(leaves)))

    def sum(self, values) -> np.ndarray:
        """Element-wise sum over ranks of a small float array (the values themselves alone)."""
        if self.size == 1:
            return np.asarray(values, np.float64)
        return self.ops.reduce_numpy(np.asarray(values, np.float32), "sum")

    def max(self, value: float | None) -> float | None:
        """The largest value over ranks (None stays None: every rank runs the same device kind)."""
        if self.size == 1 or value is None:
            return value
        return float(self.ops.reduce_numpy(np.asarray([value], np.float32), "max")[0])

    def any(self, flag: bool) -> bool:
        return bool(flag) if self.size == 1 else bool(self.sum([1.0 if flag else 0.0])[0] > 0)

    def which(self, flag: bool) -> list[int]:
        """The ranks where `flag` is true (every rank learns the same list)."""
        if self.size == 1:
            return [0] if flag else []
        onehot = np.zeros(self.size, np.float32)
        onehot[self.rank] = 1.0 if flag else 0.0
        return [int(r) for r in np.nonzero(self.sum(onehot))[0]]

    def check_rows(self, n_rows: int, per_rank: int) -> None:
        if self.size > 1 and n_rows < per_rank * self.size:
            raise ForgeError(f"{n_rows} training rows cannot fill one global micro-batch of {per_rank} rows x "
                             f"{self.size} ranks; use fewer processes or a smaller train.batch_size")

    @contextmanager
    def stops_cleanly(self, run, step_now, patience=lambda: 0.0):
        """Around the loop under a launcher: a collective that finds a peer gone ends this rank with one PeerLost
        line, and a signalled rank never hangs.

        A signal (the launcher's SIGTERM when another rank failed or the job is cancelled; Ctrl-C) asks for a
        polite stop (stopping.py): the ranks finish the step, agree, save and end. But a rank can be stuck inside
        a collective whose peer is gone, where no Python code runs. So a watchdog thread also hears the signal
        (the interpreter's wakeup fd): if the rank has not ended GRACE_S + patience() seconds later (patience:
        what the step under way and a checkpoint may still take), it says so and exits."""
        if self.size == 1:
            yield
            return
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd)
        ended = threading.Event()

        def watchdog():
            signum = os.read(read_fd, 1)[0]
            if not signum:  # 0: the loop ended and closes the watch
                os.close(read_fd)
                return
            grace = GRACE_S + patience()
            if ended.wait(grace):  # the loop ended (stopped politely, or finished) in time
                return
            what = "was interrupted" if signum == signal.SIGINT else "was stopped by the launcher"
            os.write(2, f"forge: error: rank {self.rank} of {self.size} {what} at step {step_now()} and did not "
                        f"end within {grace:.0f}s (another rank failed or the job was cancelled)\n".encode())
            os._exit(128 + signum)

        threading.Thread(target=watchdog, name="forge-stop-watchdog", daemon=True).start()
        try:
            yield
        except PeerLost:
            raise
        except Exception as exc:
            if is_peer_lost(exc):
                raise self.lost_peers(exc, step_now(), run) from None
            raise
        finally:
            ended.set()
            signal.set_wakeup_fd(previous_fd)
            os.write(write_fd, b"\0")
            os.close(write_fd)

    def lost_peers(self, exc: BaseException, step: int, run) -> PeerLost:
        last = run.latest()
        where = f"the newest checkpoint is step {last[0]}" if last else "no checkpoint was saved yet"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        return PeerLost(f"rank {self.rank} of {self.size} lost the other ranks at step {step} ({first}); "
                        f"{where} - resume with the same launcher and `forge train --resume {run.path}`")


def _flatten(tree, out: list):
    """The tree's structure with its array leaves appended to `out` (None stays None)."""
    if isinstance(tree, dict):
        return {k: _flatten(v, out) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_flatten(v, out) for v in tree)
    if tree is None:
        return None
    out.append(tree)
    return _LEAF


def _rebuild(shape, leaves):
    if isinstance(shape, dict):
        return {k: _rebuild(v, leaves) for k, v in shape.items()}
    if isinstance(shape, (list, tuple)):
        return type(shape)(_rebuild(v, leaves) for v in shape)
    return None if shape is None else next(leaves)


_LEAF = object()
