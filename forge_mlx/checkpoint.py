"""Checkpoints: adapter weights + optimizer state + loop state, written as one atomic directory.

RNG: the loop reseeds MLX's generator from (seed, step) at every optimizer step, so the random
state is a function of the step and restoring the step restores it exactly.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from safetensors.numpy import load_file, save_file

from forge_core.atomic import atomic_dir
from forge_core.rundir import RunDir

from .lora import load_trainable, trainable_params


def _to_numpy(tree) -> dict[str, np.ndarray]:
    # ascontiguousarray: safetensors writes raw memory, and an mx array may be a strided view
    return {k: np.ascontiguousarray(np.array(v)) for k, v in tree_flatten(tree) if isinstance(v, mx.array)}


def save_checkpoint(run: RunDir, step: int, model, optimizer, loop_state: dict) -> None:
    with atomic_dir(run.checkpoint_dir(step)) as tmp:
        save_file(_to_numpy(trainable_params(model)), str(tmp / "adapters.safetensors"))
        save_file(_to_numpy(optimizer.state), str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=2))
    run.mark_latest(step)  # the pointer moves only once the checkpoint is complete


def load_checkpoint(run: RunDir, model, optimizer) -> dict:
    """Restore weights + optimizer from the newest checkpoint; returns its loop state (incl. step)."""
    latest = run.latest()
    if latest is None:
        return {"step": 0}
    step, path = latest
    load_trainable(model, {k: mx.array(v) for k, v in load_file(str(path / "adapters.safetensors")).items()})
    optimizer.init(model.trainable_parameters())  # the full state tree, then overwrite its leaves
    flat = dict(tree_flatten(optimizer.state))
    flat.update({k: mx.array(v) for k, v in load_file(str(path / "optimizer.safetensors")).items()})
    optimizer.state = tree_unflatten(list(flat.items()))
    mx.eval(model.parameters(), optimizer.state)
    return json.loads((path / "state.json").read_text())
