"""Checkpoints: adapter weights + optimizer state + loop state, written as one atomic directory.

    RUN/checkpoints/step_NNNNNN/
        adapters.safetensors    the trainable LoRA factors, fp32, under the backend's parameter names
        optimizer.safetensors   the optimizer's tensors: MLX's state tree flattened ("<param>.m", "step"...),
                                torch's "<param name>/<state key>[/<key>]" (bitsandbytes' 8-bit state too)
        objective.safetensors   (when the objective has any) arrays its state needs: GRPO's generation in use
        state.json              {"step", "data": the data order's position, "optimizer_scalars": non-tensor state,
                                 "files": {name: {"size", "sha256"}} of the tensor files}
A resume checks the newest checkpoint against its manifest (and the safetensors headers) before loading it; a
damaged one (a disk filled up, a copy cut short) is named in one line and the one before it is used instead.
No pickles: tensors are safetensors, everything else JSON. Hyperparameters are not stored (they come from
the config, and the loop sets the learning rate every step). RNG: the loop reseeds the framework from
(seed, step) every step, so restoring the step restores the random state. The stepper turns its state into
numpy arrays and back (forge_core.backend.Stepper); this file only writes and reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.numpy import load_file

from forge_core.adapters import safetensors_io as sio
from forge_core.atomic import atomic_dir
from forge_core.checksum import file_entry, mismatch
from forge_core.errors import ForgeError
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
        files = {f.name: file_entry(f) for f in sorted(tmp.glob("*.safetensors"))}
        state = {"step": step, **loop_state, **({"optimizer_scalars": scalars} if scalars else {}), "files": files}
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    run.mark_latest(step)  # the pointer moves only once the checkpoint is complete


def load_checkpoint(run: RunDir, stepper, say=print) -> dict:
    """Restore weights + optimizer from the newest INTACT checkpoint; returns its loop state (incl. step).

    A damaged newer checkpoint is reported through `say` and skipped; with none intact the resume stops with
    one line (never a silent fresh start)."""
    latest = run.latest()
    if latest is None:
        return {"step": 0}
    candidates = [latest] + [c for c in run.checkpoints() if c[0] < latest[0]]
    for step, path in candidates:
        damage = checkpoint_damage(path)
        if damage is None:
            loop = json.loads((path / "state.json").read_text())
            loop.pop("files", None)
            stepper.load_state_arrays(load_file(str(path / "adapters.safetensors")),
                                      load_file(str(path / "optimizer.safetensors")),
                                      loop.pop("optimizer_scalars", {}))
            if (path / "objective.safetensors").is_file():
                loop["arrays"] = load_file(str(path / "objective.safetensors"))
            return loop
        say(f"checkpoint {path} is damaged ({damage}); using the one before it")
    raise ForgeError(f"{run.path}: no intact checkpoint to resume from (the newest, {latest[1]}, is damaged); "
                     "start a new run with another --out")


def checkpoint_damage(path: Path) -> str | None:
    """What is wrong with the checkpoint dir `path`, or None when it is whole: state.json readable, each tensor
    file present with the size and sha256 the manifest names (a checkpoint from before manifests: its
    safetensors headers and sizes are checked instead)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json unreadable: {type(e).__name__}"
    files = state.get("files")
    if files is None:  # written before checkpoints carried a manifest
        files = {n: None for n in ("adapters.safetensors", "optimizer.safetensors")}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} missing"
        problem = mismatch(f, want) if want is not None else sio.header_damage(f)
        if problem:
            return problem if want is not None else f"{name}: {problem}"
    return None
