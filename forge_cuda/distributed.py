"""torch.distributed for forge_core/distributed.py: the process group torchrun describes (gloo on the CPU,
nccl on GPUs), and sums over it. Without a launcher (WORLD_SIZE unset or 1) everything is the identity.
Arrays travel as ONE flat buffer per call: a LoRA gradient is a few hundred small tensors.
"""

from __future__ import annotations

import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from forge_core.errors import ForgeError

# how long a collective waits for a rank that neither answers nor dies (a dead rank is seen at once)
TIMEOUT = timedelta(minutes=10)


def init_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if torch.cuda.is_available():
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:
            raise ForgeError(f"the launcher started more processes on this machine than it has GPUs ({gpus}); "
                             f"use --nproc-per-node {gpus} (or CUDA_VISIBLE_DEVICES= to train on the CPU with gloo)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_sum(arrays: list) -> list:
    if size() == 1 or not arrays:
        return list(arrays)
    flat = torch.cat([a.detach().reshape(-1).float() for a in arrays])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset:offset + a.numel()].view(a.shape).to(a.dtype))
        offset += a.numel()
    return out


def all_sum_(tensors: list) -> None:
    """In place: each tensor becomes its sum over ranks (the gradients, before the optimizer step)."""
    if size() == 1 or not tensors:
        return
    for t, summed in zip(tensors, all_sum(tensors)):
        t.copy_(summed)


def reduce_numpy(values, op: str):
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    t = torch.from_numpy(np.asarray(values, np.float32).copy()).to(device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().numpy()
