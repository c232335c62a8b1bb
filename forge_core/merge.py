"""`forge merge`: SLERP, linear and TIES merges of full checkpoints of one architecture, tensor by tensor.

Framework-free (numpy), one tensor name at a time over the models' safetensors and one output shard (at most
5 GB, as the merged export writes them) in memory, so it runs on an MLX-only Mac. The formulas are mergekit's (tests check them against
mergekit's own functions on the same tensors):
  slerp  two models A, B and t: each tensor flattened, a = A, b = B; with â, b̂ the unit vectors and
         d = clamp(â·b̂, −1, 1): |d| > 0.9995 -> (1 − t)·a + t·b; else θ = acos d,
         sin((1 − t)θ)/sin θ · a + sin(tθ)/sin θ · b. t = 0 gives A, t = 1 gives B.
  linear Σ wᵢ·Mᵢ / Σ wᵢ (weights default 1: the mean).
  ties   a base and models Mᵢ: δᵢ = Mᵢ − base keeps its `density` share of largest |δᵢ| (TIES' trim),
         weighted by wᵢ; the sign of Σ wᵢδᵢ per element is elected, and base + Σ_agreeing wᵢδᵢ / Σ_agreeing wᵢ.
t can vary by layer as mergekit's configs allow: a list of values is a gradient spread over the layers
(linear interpolation), and a filter gives tensors whose name contains it their own value or gradient:
`--t 0.5 --t self_attn=0,0.5,1 --t mlp=1,0.5,0`. Tensors outside the layers (embeddings, final norm, head)
take the plain value (or a gradient's first value).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from forge_core.adapters import safetensors_io as sio
from forge_core.atomic import atomic_dir, write_json
from forge_core.errors import ForgeError

METHODS = ("slerp", "linear", "ties")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


# ---------------------------------------------------------------- the formulas

def slerp(t: float, a: np.ndarray, b: np.ndarray, dot_threshold: float = 0.9995, eps: float = 1e-8) -> np.ndarray:
    """Spherical interpolation of two tensors (float64 inside), as mergekit computes it."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if x.size == 0:
        return a.copy()
    na, nb = np.linalg.norm(x), np.linalg.norm(y)
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = float(np.clip(np.dot(x / na, y / nb), -1.0, 1.0))
    if abs(dot) > dot_threshold:
        ca, cb = 1.0 - t, t
    else:
        theta = np.arccos(dot)
        ca, cb = np.sin((1.0 - t) * theta) / np.sin(theta), np.sin(t * theta) / np.sin(theta)
    return (ca * x + cb * y).reshape(a.shape)


def linear(tensors: list[np.ndarray], weights: list[float], normalize: bool = True) -> np.ndarray:
    out = sum(w * t.astype(np.float64) for w, t in zip(weights, tensors))
    return out / sum(weights) if normalize else out


def trim(delta: np.ndarray, density: float) -> np.ndarray:
    """The `density` share of the largest-magnitude entries of delta (at least one), the rest zero."""
    if density >= 1:
        return delta
    if density <= 0 or delta.size == 0:
        return np.zeros_like(delta)
    k = max(1, int(density * delta.size))
    flat = delta.ravel()
    keep = np.argpartition(-np.abs(flat), k - 1)[:k]  # the k largest (ties at the edge: any of them)
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ties(base: np.ndarray, tensors: list[np.ndarray], weights: list[float], density: float,
         normalize: bool = True) -> np.ndarray:
    """TIES in two passes over the models, float32, one trimmed delta in memory at a time (plus the sums)."""
    b = base.astype(np.float32)
    total = np.zeros_like(b)  # Σ wᵢδᵢ: its sign is the elected one
    for t, w in zip(tensors, weights):
        total += w * trim(t.astype(np.float32) - b, density)
    majority = np.where(total >= 0, 1.0, -1.0).astype(np.float32)
    mixed, divisor = np.zeros_like(b), np.zeros_like(b)
    for t, w in zip(tensors, weights):
        d = w * trim(t.astype(np.float32) - b, density)
        agree = np.sign(d) == majority
        mixed += d * agree
        divisor += w * agree
    if normalize:
        mixed = mixed / np.where(divisor == 0, 1.0, divisor)
    return b + mixed


# ---------------------------------------------------------------- t by layer

def parse_t(specs: list[str]) -> dict[str, list[float]]:
    """--t values: "0.5", "0,0.5,1" (a gradient), "FILTER=0.3" or "FILTER=0,1" -> {filter or "": values}."""
    out = {}
    for spec in specs:
        name, _, values = spec.rpartition("=")
        try:
            out[name] = [float(v) for v in values.split(",")]
        except ValueError:
            raise ForgeError(f"--t {spec}: write a number, a comma-separated gradient, or FILTER=VALUES") from None
        if not all(0.0 <= v <= 1.0 for v in out[name]):
            raise ForgeError(f"--t {spec}: values go from 0 (the first model) to 1 (the second)")
    return out


def t_for(name: str, ts: dict[str, list[float]], n_layers: int) -> float:
    """The t of tensor `name`: its filter's values (the first filter it contains), else the plain ones; a
    gradient read at the tensor's layer."""
    values = next((v for f, v in ts.items() if f and f in name), ts.get("", [0.5]))
    m = _LAYER.search(name)
    if len(values) == 1 or not m:
        return values[0]
    pos = int(m.group(1)) / max(n_layers - 1, 1) * (len(values) - 1)
    lo = min(int(pos), len(values) - 2)
    return values[lo] + (pos - lo) * (values[lo + 1] - values[lo])


# ---------------------------------------------------------------- checkpoints

def _tensors(model: Path) -> dict[str, tuple[Path, sio.TensorInfo]]:
    return {name: (f, info) for f in sio.checkpoint_files(model) for name, info in sio.read_header(f)[0].items()}


def _check_same(models: list[Path], tables: list[dict]) -> dict:
    configs = [json.loads((m / "config.json").read_text()) for m in models]
    keys = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads")
    for m, c in zip(models[1:], configs[1:]):
        diff = [k for k in keys if c.get(k) != configs[0].get(k)]
        if diff:
            raise ForgeError(f"{m}: not the architecture of {models[0]} ({diff[0]}: {c.get(diff[0])} vs "
                             f"{configs[0].get(diff[0])}); merge checkpoints of one architecture")
    for m, t in zip(models[1:], tables[1:]):
        missing = set(tables[0]) ^ set(t)
        if missing:
            raise ForgeError(f"{m}: its weights differ from {models[0]}'s (e.g. {min(missing)})")
        for name, (_, info) in t.items():
            if tuple(info.shape) != tuple(tables[0][name][1].shape):
                raise ForgeError(f"{m}: {name} has shape {tuple(info.shape)}, {models[0]} has "
                                 f"{tuple(tables[0][name][1].shape)}")
    return configs[0]


def merge(models: list[str], out: str, method: str = "slerp", t: list[str] | None = None,
          weights: list[float] | None = None, base: str | None = None, density: float = 0.5,
          dtype: str = "float32") -> Path:
    """Merge full HF checkpoints (merged exports, or any safetensors models of one architecture) into `out`."""
    from forge_core.adapters.export import SHARD_BYTES, copy_tokenizer, plan_shards
    from forge_core.models.sources import resolve_model

    if method not in METHODS:
        raise ForgeError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if t and method != "slerp":
        raise ForgeError(f"--t is slerp's; {method} mixes by --weight")
    if weights and method == "slerp":
        raise ForgeError("--weight is for linear and ties; slerp mixes two models by --t")
    if base and method != "ties":
        raise ForgeError(f"--base is the model ties subtracts; {method} has none")
    if method == "ties" and not 0 < density <= 1:
        raise ForgeError(f"--density {density}: the share of each delta kept, in (0, 1]")
    if weights and abs(sum(weights)) < 1e-8:
        raise ForgeError("--weight values sum to 0; the merge divides by their sum")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ForgeError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    paths = [resolve_model(m) for m in models]
    if method == "slerp" and len(paths) != 2:
        raise ForgeError(f"slerp merges two models; got {len(paths)}")
    if method == "ties" and not base:
        raise ForgeError("ties needs --base: the model the others were fine-tuned from")
    base_path = resolve_model(base) if base else None
    everyone = paths + ([base_path] if base_path else [])
    for p in everyone:
        c = json.loads((p / "config.json").read_text())
        if c.get("quantization") or c.get("quantization_config"):
            raise ForgeError(f"{p}: the checkpoint is quantized; merge full-precision checkpoints (a merged export "
                             "without --quantize)")
    tables = [_tensors(p) for p in everyone]
    cfg = _check_same(everyone, tables)
    weights = list(weights) if weights else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise ForgeError(f"--weight given {len(weights)} times for {len(paths)} models")
    ts = parse_t(t or ["0.5"])
    n_layers = int(cfg.get("num_hidden_layers", 1))
    out = Path(out)
    entries = sorted((name, f, info) for name, (f, info) in tables[0].items())
    shards, total = plan_shards(entries, dtype, SHARD_BYTES)
    with atomic_dir(out) as tmp:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            merged = {}
            for name, *_ in shard:
                arrays = [sio.read_tensor(*tab[name]) for tab in tables]
                merged[name] = _merged(method, name, arrays, len(paths), ts, n_layers, weights, density)
                weight_map[name] = fname
            sio.save(tmp / fname, merged, metadata={"format": "pt"}, as_dtype={n: w for n, _, _, w in shard})
        write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                          "weight_map": weight_map})
        cfg["torch_dtype"] = dtype
        if "dtype" in cfg:
            cfg["dtype"] = dtype
        write_json(tmp / "config.json", cfg)
        copy_tokenizer(paths[0], tmp)
        write_json(tmp / "forge_merge.json", {"method": method, "models": [str(p) for p in paths],
                                              "base": str(base_path) if base_path else None, "t": ts,
                                              "weights": weights, "density": density})
    return out


def _merged(method, name, arrays, n_models, ts, n_layers, weights, density) -> np.ndarray:
    """One tensor of the merge, float32 (a non-float tensor is the first model's)."""
    if not np.issubdtype(arrays[0].dtype, np.floating):
        return arrays[0]
    if method == "slerp":
        out = slerp(t_for(name, ts, n_layers), arrays[0], arrays[1])
    elif method == "linear":
        out = linear(arrays[:n_models], weights)
    else:
        out = ties(arrays[-1], arrays[:n_models], weights, density)
    return out.astype(np.float32)
