"""The memory plan of a server, before anything is loaded: each base once (as trained: its bits; on a CPU as the
dense copy decoding reads), a line per adapter (its factors, as stored), the KV cache of the rows decoded at once
at the longest context, and the process. Over the device's budget it refuses with what to change."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

from forge_core.errors import ForgeError
from forge_core.memory.budget import device_budget, human, plans_for_gpu
from forge_core.memory.estimate import make_run
from forge_core.memory.shape import ModelShape, compute_bytes
from forge_core.memory.weights import weight_components
from forge_core.models.sources import resolve_model
from forge_core.serve.catalog import Catalog
from forge_core.serve.settings import ServeSettings

PROCESS = 400 * 2**20  # interpreter, framework, tokenizer and server: measured RSS of an idle 135M server ~0.4 GiB over its weights


def _shape(cfg) -> ModelShape:
    path = Path(resolve_model(cfg.model.path)) / "config.json"
    return ModelShape.from_config(json.loads(path.read_text()), str(path))


def serve_plan(catalog: Catalog, settings: ServeSettings, backend: str) -> tuple[list[tuple[str, int, str]], int]:
    """(lines (what, bytes, note), budget bytes)."""
    lines = []
    shape = None
    for members in catalog.groups().values():
        cfg = copy.deepcopy(members[0].cfg)
        on_gpu = plans_for_gpu(backend, cfg)
        adapted = any(m.adapter_dir for m in members)
        if not adapted or not on_gpu:
            cfg.quant.bits = 0  # served as loaded / dequantized once for CPU decoding
        shape = _shape(cfg)
        run = make_run(cfg, shape, "sft", backend, on_gpu)
        note = (f"{cfg.quant.bits}-bit residual" if cfg.quant.bits else "full precision") + \
            (", dequantized for CPU decoding" if adapted and not on_gpu and members[0].cfg.quant.bits else "")
        lines.append((f"base {cfg.model.path}", sum(c.bytes for c in weight_components(run)),
                      f"{note}; serves {', '.join(m.name for m in members)}"))
        for m in members:
            if m.weights is not None:
                lines.append((f"adapter {m.name}", sum(np.asarray(v).nbytes for v in m.weights.values()),
                              f"rank {m.cfg.lora.rank}, resident"))
    cb = compute_bytes(catalog.served[catalog.base_name].cfg.model.dtype, on_gpu)
    kv = settings.max_batch * settings.max_context * shape.layers * 2 * shape.kv_heads * shape.head_dim * cb
    lines.append(("KV cache", kv, f"{settings.max_batch} rows x {settings.max_context} tokens"))
    lines.append(("process", PROCESS, "Python, framework, tokenizer, HTTP server"))
    budget, _ = device_budget(backend, catalog.served[catalog.base_name].cfg)
    return lines, budget


def check_serve_plan(catalog: Catalog, settings: ServeSettings, backend: str, say=print) -> int:
    """Print the plan; refuse (ForgeError) when it does not fit and settings.force is off. Returns the total."""
    lines, budget = serve_plan(catalog, settings, backend)
    total = sum(b for _, b, _ in lines)
    width = max(len(w) for w, _, _ in lines)
    say("memory plan (forge serve):")
    for what, nbytes, note in lines:
        say(f"  {what:<{width}}  {human(nbytes):>11}  {note}")
    say(f"  {'total':<{width}}  {human(total):>11}  of {human(budget)} available")
    if total > budget and not settings.force:
        raise ForgeError(f"forge serve needs about {human(total)}, {human(budget)} is available: serve fewer runs "
                         "(each base group costs a base), lower --max-batch or --max-context, or pass --force")
    return total
