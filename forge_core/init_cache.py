"""The init cache: PiSSA factors computed once per base, reused by every later run on it.

PEFT's PiSSA recipe saves the residual model once and trains from it many times; here the SVD's result is
kept under FORGE_HOME and found again by what it depends on:

    FORGE_HOME/init/<key>/factors.safetensors   "<module path>.A0" (r, in), "<module path>.B0" (out, r), fp32
    FORGE_HOME/init/<key>/entry.json            what the key was made of, the model dir, size and sha256

key = sha256 of (base fingerprint (models.sources.model_hash), backend, weight dtype, targets, blocks, rank,
alpha, rslora, init, seed). The quantization is not in it: the residual W - s·B0·A0 is one matmul per layer,
rebuilt from the factors exactly as a resume rebuilds it (pissa.residual), and then quantized as usual - so one
entry serves a 4-bit, an 8-bit and a full-precision run, and a run from the cache ends bit-identical to one
without it (tests). An entry is written atomically and checked against its sha256 on every read: a damaged one
is reported in one line, removed and rebuilt, never used. `forge cache ls` lists the entries, `forge cache rm`
frees them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.atomic import atomic_dir
from forge_core.checksum import file_entry, mismatch
from forge_core.config import ForgeConfig
from forge_core.errors import ForgeError
from forge_core.models.sources import forge_home, model_hash

FACTORS = "factors.safetensors"
ENTRY = "entry.json"


def cache_root() -> Path:
    """FORGE_HOME/init, or FORGE_INIT_CACHE when set (the test suite points it at a temporary dir)."""
    own = os.environ.get("FORGE_INIT_CACHE")
    return Path(own).expanduser() if own else forge_home() / "init"


def key_fields(cfg: ForgeConfig, model_dir, backend: str, weight_dtype: str) -> dict:
    """Everything the factors depend on (the randomized SVD's sketch follows the seed)."""
    lora = cfg.lora
    return {"base": model_hash(model_dir), "backend": backend, "dtype": weight_dtype,
            "targets": sorted(lora.targets), "layers": str(lora.layers), "rank": lora.rank, "alpha": lora.alpha,
            "rslora": lora.rslora, "init": lora.init, "seed": cfg.train.seed}


def entry_dir(fields: dict) -> Path:
    blob = json.dumps(fields, sort_keys=True).encode()
    return cache_root() / hashlib.sha256(blob).hexdigest()[:12]


def lookup(fields: dict, say=print) -> dict | None:
    """The cached {path: (A0 (r, in), B0 (out, r))}, or None (no entry, or a damaged one: removed, said)."""
    d = entry_dir(fields)
    if not (d / ENTRY).is_file():
        return None
    try:
        entry = json.loads((d / ENTRY).read_text())
        problem = mismatch(d / FACTORS, entry)
        if problem:
            raise ValueError(problem)
        flat = sio.load(d / FACTORS)
    except Exception as e:  # noqa: BLE001 - any damage means: do not use it, rebuild
        say(f"init cache entry {d} is damaged ({e}); removing it and computing the factors again")
        shutil.rmtree(d, ignore_errors=True)
        return None
    paths = sorted({k.rsplit(".", 1)[0] for k in flat})
    return {p: (flat[f"{p}.A0"], flat[f"{p}.B0"]) for p in paths}


def store(fields: dict, factors: dict, model_dir, build_seconds: float) -> Path:
    """Write one entry atomically (a concurrent writer of the same key just wins the rename)."""
    d = entry_dir(fields)
    flat = {}
    for path, (a0, b0) in factors.items():
        flat[f"{path}.A0"] = np.ascontiguousarray(a0, np.float32)
        flat[f"{path}.B0"] = np.ascontiguousarray(b0, np.float32)
    with atomic_dir(d) as tmp:
        sio.save(tmp / FACTORS, flat)
        entry = {"key": fields, "model_dir": str(model_dir), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "layers_adapted": len(factors), "build_seconds": round(build_seconds, 1),
                 **file_entry(tmp / FACTORS)}
        (tmp / ENTRY).write_text(json.dumps(entry, indent=2) + "\n")
    return d


def entries() -> list[dict]:
    """Every readable entry, newest first, with its dir."""
    root = cache_root()
    found = []
    for d in root.iterdir() if root.is_dir() else []:
        try:
            entry = json.loads((d / ENTRY).read_text())
        except (OSError, ValueError):
            continue  # an import in progress (temp dir) or a stranger
        found.append({**entry, "dir": str(d), "id": d.name})
    return sorted(found, key=lambda e: e.get("created", ""), reverse=True)


def remove(ids: list[str], everything: bool = False) -> list[str]:
    """Delete entries by id (a unique prefix will do) or all; returns the ids removed."""
    known = [e["id"] for e in entries()]
    chosen = list(known) if everything else []
    for want in ids:
        hits = [k for k in known if k.startswith(want)]
        if len(hits) != 1:
            raise ForgeError(f"init cache: '{want}' matches {len(hits)} entries; see `forge cache ls`")
        chosen += hits
    for k in chosen:
        shutil.rmtree(cache_root() / k, ignore_errors=True)
    return chosen


def print_entries() -> None:
    """`forge cache ls`: one row per entry."""
    from rich.console import Console
    from rich.table import Table

    from forge_core.memory.budget import human

    rows = entries()
    table = Table(title=f"Forge init cache ({cache_root()})",
                  caption=f"{len(rows)} entries, {human(sum(e['size'] for e in rows))}; "
                          "`forge cache rm ID` / `--all` frees them")
    for col in ("id", "model", "rank", "init", "layers", "size", "created"):
        table.add_column(col, no_wrap=col in ("id", "init"), overflow="fold", min_width=12 if col == "id" else None)
    for e in rows:
        k = e["key"]
        table.add_row(e["id"], e["model_dir"], str(k["rank"]), k["init"], str(e["layers_adapted"]),
                      human(e["size"]), e["created"])
    Console().print(table)
