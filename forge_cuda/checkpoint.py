"""Checkpoints: adapter weights + optimizer state + loop state, written as one atomic directory.

    adapters.safetensors    {"<module>.lora_A" (r,in), "<module>.lora_B" (out,r)} fp32
    optimizer.safetensors   {"<param name>/<state key>[/<key>]": tensor} - AdamW's exp_avg/exp_avg_sq/step,
                            or bitsandbytes' nested state1/state2/absmax/qmap (uint8 included), as stored
    state.json              {"step", "data": data order state, "optimizer_scalars": non-tensor state}
No pickles: every tensor is safetensors, everything else JSON. Hyperparameters (param_groups) are not
stored - they come from the config, and the loop sets lr from the schedule every step.
RNG: the loop reseeds torch from (seed, step) at every optimizer step, so the random state is a
function of the step and restoring the step restores it exactly.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from forge_core.atomic import atomic_dir
from forge_core.errors import ForgeError
from forge_core.rundir import RunDir

from .lora import load_trainable, trainable_params


def _flatten(prefix: str, state: dict, tensors: dict, scalars: dict) -> None:
    for key, v in state.items():
        if isinstance(v, dict):  # bitsandbytes nests its 8-bit state one level down
            _flatten(f"{prefix}/{key}", v, tensors, scalars)
        elif torch.is_tensor(v):
            tensors[f"{prefix}/{key}"] = v.detach().cpu().clone()  # clone: bnb shares its qmaps
        else:
            scalars[f"{prefix}/{key}"] = v


def _optimizer_flat(model, optimizer) -> tuple[dict, dict]:
    """Optimizer state keyed "<param NAME>/<key>[/<key>]" (not by index): (tensors, JSON scalars)."""
    names = list(trainable_params(model))
    tensors, scalars = {}, {}
    for idx, st in optimizer.state_dict()["state"].items():
        _flatten(names[idx], st, tensors, scalars)
    return tensors, scalars


def save_checkpoint(run: RunDir, step: int, model, optimizer, loop_state: dict) -> None:
    tensors, scalars = _optimizer_flat(model, optimizer)
    with atomic_dir(run.checkpoint_dir(step)) as tmp:
        weights = {k: p.detach().float().cpu().contiguous() for k, p in trainable_params(model).items()}
        save_file(weights, str(tmp / "adapters.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": step, **loop_state, "optimizer_scalars": scalars}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    run.mark_latest(step)  # the pointer moves only once the checkpoint is complete


def load_checkpoint(run: RunDir, model, optimizer) -> dict:
    """Restore weights + optimizer from the newest checkpoint; returns its loop state (incl. step)."""
    latest = run.latest()
    if latest is None:
        return {"step": 0}
    _, path = latest
    load_trainable(model, load_file(str(path / "adapters.safetensors")))
    loop = json.loads((path / "state.json").read_text())
    flat = {**load_file(str(path / "optimizer.safetensors")), **loop.pop("optimizer_scalars", {})}
    index = {name: i for i, name in enumerate(trainable_params(model))}
    state: dict[int, dict] = {}
    for key, v in flat.items():
        name, *fields = key.split("/")
        if name not in index:
            raise ForgeError(f"{path}: optimizer state for '{name}', which this model does not train")
        node = state.setdefault(index[name], {})
        for f in fields[:-1]:
            node = node.setdefault(f, {})
        node[fields[-1]] = v
    sd = optimizer.state_dict()
    sd["state"] = state
    optimizer.load_state_dict(sd)  # moves tensors to each parameter's device
    return loop
