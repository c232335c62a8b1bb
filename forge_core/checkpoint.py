"""Checkpoints: adapter weights + optimizer state + loop state, written as one atomic directory.

    RUN/checkpoints/step_NNNNNN/
        adapters.safetensors    the trainable LoRA factors, fp32, under the backend's parameter names
        optimizer.safetensors   the optimizer's tensors: MLX's state tree flattened ("<param>.m", "step"...),
                                torch's "<param name>/<state key>[/<key>]" (bitsandbytes' 8-bit state too)
        objective.safetensors   (when the objective has any) arrays its state needs: GRPO's generation in use
        state.json              {"step", "data": the data order's position, "optimizer_scalars": non-tensor state}
No pickles: tensors are safetensors, everything else JSON. Hyperparameters are not stored (they come from
the config, and the loop sets the learning rate every step). RNG: the loop reseeds the framework from
(seed, step) every step, so restoring the step restores the random state. The stepper turns its state into
numpy arrays and back (forge_core.backend.Stepper); this file only writes and reads them.
"""

from __future__ import annotations

import json

from safetensors.numpy import load_file

from forge_core.adapters import safetensors_io as sio
from forge_core.atomic import atomic_dir
from forge_core.rundir import RunDir


def save_checkpoint(run: RunDir, step: int, stepper, loop_state: dict, arrays: dict | None = None) -> None:
    """`arrays`: what the objective needs beyond its JSON state to go on exactly (GRPO: the completions a
    generation still trains on), as objective.safetensors."""
    weights, tensors, scalars = stepper.state_arrays()
    with atomic_dir(run.checkpoint_dir(step)) as tmp:
        sio.save(tmp / "adapters.safetensors", weights)
        sio.save(tmp / "optimizer.safetensors", tensors)
        if arrays:
            sio.save(tmp / "objective.safetensors", arrays)
        state = {"step": step, **loop_state, **({"optimizer_scalars": scalars} if scalars else {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    run.mark_latest(step)  # the pointer moves only once the checkpoint is complete


def load_checkpoint(run: RunDir, stepper) -> dict:
    """Restore weights + optimizer from the newest checkpoint; returns its loop state (incl. step)."""
    latest = run.latest()
    if latest is None:
        return {"step": 0}
    _, path = latest
    loop = json.loads((path / "state.json").read_text())
    stepper.load_state_arrays(load_file(str(path / "adapters.safetensors")),
                              load_file(str(path / "optimizer.safetensors")), loop.pop("optimizer_scalars", {}))
    if (path / "objective.safetensors").is_file():
        loop["arrays"] = load_file(str(path / "objective.safetensors"))
    return loop
