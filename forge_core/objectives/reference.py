"""The reference of the reference-based methods (DPO, KTO): the policy at initialisation, scored once.

For PiSSA the policy at init is W_res + s·B0A0 (= the original model), not the adapter-off model W_res;
continuing from an SFT adapter it is that adapter. Either way it is exactly the model built before the
first step, so the data is scored with it once (RUN/reference_logps.safetensors) and no second copy of
the weights is ever kept. Under a launcher the rows are shared out and the scores summed over ranks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
from safetensors.numpy import load_file

from forge_core.adapters import safetensors_io as sio
from forge_core.data import source_key
from forge_core.methods import section


def fingerprint(cfg, kind: str, **extra) -> str:
    """What a run's reference scores depend on: the model, its adapter and quantization, the data and how it is
    read, the method's settings (and e.g. KTO's pairing). A cache with another fingerprint is scored anew."""
    files = [source_key(p) for p in (cfg.data.train, cfg.data.valid) if p]
    return json.dumps({"kind": kind, "model": dataclasses.asdict(cfg.model), "lora": dataclasses.asdict(cfg.lora),
                       "quant": dataclasses.asdict(cfg.quant), "data": dataclasses.asdict(cfg.data), "files": files,
                       "max_seq_len": cfg.train.max_seq_len, "method": dataclasses.asdict(section(cfg, kind)),
                       **extra}, sort_keys=True, default=str)


def scored_once(run, world, console, what: str, splits: dict, key: str = "") -> dict[str, np.ndarray]:
    """{split: (N, k) scores} for splits {name: (rows, score)}, score(rows) -> (len(rows), k) float32, from the
    run's cache when it was made for the same `key` (fingerprint) and holds every split at its size (a resume),
    else computed now and cached (rank 0)."""
    f = run.file("reference_logps.safetensors")
    tag = np.frombuffer(hashlib.sha256(key.encode()).digest(), np.uint8).copy()
    if f.is_file():
        cached = load_file(str(f))
        same = "fingerprint" in cached and np.array_equal(cached["fingerprint"], tag)
        if same and all(k in cached and cached[k].shape[0] == len(rows) for k, (rows, _) in splits.items()):
            return {k: cached[k] for k in splits}
    console.print(f"scoring {sum(len(rows) for rows, _ in splits.values())} {what} with the reference "
                  "(the policy at init)...")
    ref = {k: score_shared(world, rows, score) for k, (rows, score) in splits.items()}
    if world.main:
        sio.save(f, {**ref, "fingerprint": tag})
    return ref


def score_shared(world, rows: list, score) -> np.ndarray:
    """score(rows) with the rows shared out: rank r scores rows r, r + world, ...; the sum over ranks of the
    zero-filled arrays is every row's score."""
    if world.size == 1 or not rows:  # every rank has the same rows: all skip the exchange alike
        return score(rows)
    mine = list(range(world.rank, len(rows), world.size))
    part = score([rows[i] for i in mine]) if mine else None
    width = world.max(part.shape[1] if part is not None else 0)  # a rank with no rows still learns the width
    out = np.zeros((len(rows), int(width)), np.float32)
    if mine:
        out[mine] = part
    return world.sum(out)
