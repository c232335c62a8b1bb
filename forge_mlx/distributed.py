"""mx.distributed for forge_core/distributed.py: the group mlx.launch set up (ring, MPI...), and sums over it.

A process started without a launcher gets a group of one, and every function here is then the identity.
Arrays travel as ONE float32 buffer per call: a LoRA gradient is a few hundred small tensors.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

_group = None


def init_world() -> tuple[int, int]:
    global _group
    if _group is None:
        _group = mx.distributed.init()  # a group of one unless mlx.launch configured a backend
    return _group.rank(), _group.size()


def size() -> int:
    return 1 if _group is None else _group.size()


def all_sum(arrays: list) -> list:
    if size() == 1 or not arrays:
        return list(arrays)
    flat = mx.concatenate([a.reshape(-1).astype(mx.float32) for a in arrays])
    flat = mx.distributed.all_sum(flat, group=_group)
    out, offset = [], 0
    for a in arrays:
        out.append(flat[offset:offset + a.size].reshape(a.shape).astype(a.dtype))
        offset += a.size
    return out


def reduce_numpy(values, op: str):
    reduce = {"sum": mx.distributed.all_sum, "max": mx.distributed.all_max}[op]
    return np.array(reduce(mx.array(np.asarray(values, np.float32)), group=_group))
