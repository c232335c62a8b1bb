"""forge_core.distributed without a launcher: a world of one, how ranks read the launchers' environment,
tree sums, and the launcher command lines forge execs for --nproc."""

import json
import os
import sys

import pytest

from forge_core.distributed import World, _flatten, _rebuild, env_rank, is_peer_lost, local_ranks
from forge_core.relaunch import launcher_command


def test_a_world_of_one_is_the_identity():
    w = World()
    assert (w.rank, w.size, w.main) == (0, 1, True)
    assert w.shard([5, 6, 7, 8], 4) == [5, 6, 7, 8]
    assert w.any(True) and not w.any(False) and w.which(True) == [0] and w.which(False) == []
    assert w.max(3.5) == 3.5 and w.max(None) is None
    tree = [1.0, None, {"a": 2.0}]
    assert w.all_sum(tree) is tree
    w.check_rows(1, 4)  # one process: fewer rows than a batch is allowed (the batch is the epoch)


def test_ranks_take_consecutive_slices_of_the_global_micro_batch():
    rows = list(range(8))
    assert [World(rank=r, size=4).shard(rows, 2) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_tree_flatten_and_rebuild_keep_the_structure():
    leaves = []
    shape = _flatten([1, None, {"x": 2, "y": (3, 4)}], leaves)
    assert leaves == [1, 2, 3, 4]
    assert _rebuild(shape, iter([10, 20, 30, 40])) == [10, None, {"x": 20, "y": (30, 40)}]


def test_rank_and_local_ranks_from_the_launchers_environment(monkeypatch, tmp_path):
    for key in ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK", "LOCAL_WORLD_SIZE", "MLX_HOSTFILE"):
        monkeypatch.delenv(key, raising=False)
    assert env_rank() == 0 and local_ranks() == 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert env_rank() == 3 and local_ranks() == 8
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    hostfile = tmp_path / "hosts.json"  # mlx.launch's ring hostfile: one list of ip:port per rank
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["10.0.0.2:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "1")
    assert env_rank() == 1 and local_ranks() == 2


def test_a_rank_under_mlx_launch_takes_its_share_of_the_cores_for_blas(monkeypatch, tmp_path):
    pytest.importorskip("mlx.core")
    from forge_mlx.blas import share_cores_with_local_ranks

    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.delenv("MLX_RANK", raising=False)
    share_cores_with_local_ranks()  # alone: untouched
    assert "OPENBLAS_NUM_THREADS" not in os.environ
    monkeypatch.setenv("MLX_RANK", "1")
    share_cores_with_local_ranks()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "4"  # 8 cores, 2 ranks on this machine
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's own setting wins
    share_cores_with_local_ranks()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"


def test_peer_loss_is_recognised_from_the_collectives_messages():
    assert is_peer_lost(RuntimeError("[ring] Too many send/recv errors. Failing pending tasks..."))
    assert is_peer_lost(RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert not is_peer_lost(RuntimeError("CUDA out of memory"))
    assert not is_peer_lost(ValueError("[ring] not a runtime error"))


def test_nproc_execs_the_engines_own_launchers(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    mlx = launcher_command(2, "mlx", ["train", "--steps", "3"], port=4000)
    assert mlx[:2] == [sys.executable, "-c"] and "mlx._distributed_utils.launch" in mlx[2]
    assert mlx[3:] == ["-n", "2", "--backend", "ring", "--starting-port", "4000",
                       "--", sys.executable, "-m", "forge_core.cli", "train", "--steps", "3"]
    torch = launcher_command(4, "cuda", ["dpo", "--data", "p.jsonl"])
    assert torch == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                     "forge_core.cli", "dpo", "--data", "p.jsonl"]


def test_nproc_gives_mlx_launch_free_ports_so_two_runs_at_once_do_not_collide(monkeypatch):
    import random
    import socket

    from forge_core import relaunch

    held = socket.socket()  # another run's ring listening on the first ports tried
    held.bind(("127.0.0.1", 0))
    held.listen()
    busy = held.getsockname()[1]
    tries = iter([busy - 1, busy, busy + 7])  # 3 ports from busy - 1 and from busy hit it; busy + 7 is clear
    monkeypatch.setattr(random, "randint", lambda a, b: next(tries))
    try:
        cmd = relaunch.launcher_command(3, "mlx", ["train"])
        assert cmd[cmd.index("--starting-port") + 1] == str(busy + 7)
    finally:
        held.close()
    monkeypatch.undo()
    chosen = set()
    for _ in range(10):
        cmd = relaunch.launcher_command(2, "mlx", ["train"])
        chosen.add(cmd[cmd.index("--starting-port") + 1])
    assert len(chosen) > 1  # chosen per run, not mlx.launch's fixed default
