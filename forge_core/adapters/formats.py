"""Adapter directories: read either layout into one canonical form, write either layout (convert.py: PiSSA ->
LoRA, merging, `forge convert`).

Canonical form, what every function here passes around (docs/FORMATS.md has the full tables):

    Adapter.tensors     {module path: (A (r, in), B (out, r))}   float32    y = W x + scale · B A x
    Adapter.pissa_init  {module path: (A0, B0)} when init == "pissa":  W = W_res + scale · B0 A0,
                        so relative to the ORIGINAL W the update is  ΔW = scale · (B A - B0 A0)
    Adapter.magnitudes  {module path: m (out,)} for DoRA:  W' = m / ||W + ΔW||_row · (W + ΔW)

A forge adapter dir is an mlx-lm dir (adapters.safetensors + adapter_config.json) or a PEFT dir
(adapter_model.safetensors + adapter_config.json), plus forge.json and, for PiSSA, pissa_init.safetensors.
Foreign tools never see PiSSA: conversions emit the plain rank-2r LoRA of `to_plain_lora`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forge_core.adapters import mapping as mp
from forge_core.adapters import peft_experts as pe
from forge_core.adapters import safetensors_io as sio
from forge_core.adapters.forge_json import forge_meta
from forge_core.atomic import atomic_dir, write_json
from forge_core.errors import ForgeError

WEIGHTS = {"mlx": "adapters.safetensors", "peft": "adapter_model.safetensors"}
CONFIG, FORGE, PISSA = "adapter_config.json", "forge.json", "pissa_init.safetensors"


@dataclass
class Adapter:
    tensors: dict  # {module: (A (r, in), B (out, r))} float32
    scale: float
    rank: int  # nominal rank (PEFT's r); a module's own rank is A.shape[0]
    alpha: float  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
    rslora: bool = False
    init: str = "lora"  # lora | pissa
    pissa_init: dict | None = None  # {module: (A0, B0)}
    magnitudes: dict | None = None  # DoRA {module: m (out,)}
    dropout: float = 0.0
    layout: str = "mlx"  # the layout it was read from
    forge: dict = field(default_factory=dict)  # forge.json as read ({} for a foreign adapter)
    base_model: str | None = None
    dtype: str = "float32"  # storage dtype of the source tensors; writers keep it
    source_config: dict = field(default_factory=dict)  # adapter_config.json as read

    @property
    def layers(self) -> list[int]:
        return sorted({s[0] for m in self.tensors if (s := mp.split_layer(m))})

    @property
    def targets(self) -> list[str]:
        """Leaf names of the adapted modules (q_proj, down_proj, lm_head...), as in lora.targets."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.tensors})


# ---- reading ------------------------------------------------------------------------------------

def adapter_dir(path) -> Path:
    """`path` itself, or `path/adapter` for a run dir."""
    path = Path(path)
    if not any((path / w).exists() for w in WEIGHTS.values()) and (path / "adapter").is_dir():
        return path / "adapter"
    return path


def forge_adapter_dir(path) -> Path:
    """A forge adapter: `path` or RUN/adapter holding forge.json; anything else is an error that says what to do."""
    d = adapter_dir(path)
    if not (d / FORGE).is_file():
        raise ForgeError(f"{path}: not a forge adapter or run dir (no forge.json); "
                         "use `forge convert` to bring a foreign adapter in")
    return d


def read_json(path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ForgeError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise ForgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ForgeError(f"{path}: expected a JSON object")
    return obj


def read_adapter(path) -> Adapter:
    """An mlx-lm, PEFT or forge adapter dir (or a run dir) -> canonical Adapter. Refuses what it cannot
    represent exactly: unknown tensor keys, unpaired A/B, rank mismatches, missing config fields."""
    d = adapter_dir(path)
    if not d.is_dir():
        raise ForgeError(f"{path}: not a directory")
    present = [lay for lay, w in WEIGHTS.items() if (d / w).exists()]
    if len(present) != 1:
        if (d / "adapter_model.bin").exists():
            raise ForgeError(f"{d}: adapter_model.bin is a pickle; re-save it with safe_serialization=True")
        what = "both" if present else "neither"
        raise ForgeError(f"{d}: has {what} of adapters.safetensors (mlx-lm) and "
                         "adapter_model.safetensors (PEFT)")
    meta = read_json(d / FORGE) if (d / FORGE).exists() else {}
    if meta and meta.get("format") != "forge-adapter":
        raise ForgeError(f"{d / FORGE}: 'format' is {meta.get('format')!r}, expected 'forge-adapter'")
    adapter = (_read_mlx if present[0] == "mlx" else _read_peft)(d, meta)
    _apply_forge_meta(adapter, meta, d)
    if adapter.init == "pissa":
        adapter.pissa_init = _read_pissa_init(d, adapter)
    return adapter


def _load_weights(path) -> tuple[dict, str]:
    """Tensors (BF16/F16 upcast to float32, exactly) and the storage dtype name."""
    infos, _ = sio.read_header(path)
    tags = {i.dtype for i in infos.values()}
    dtype = sio.NAMES.get(tags.pop(), "float32") if len(tags) == 1 else "float32"
    return {k: v.astype(np.float32) for k, v in sio.load(path).items()}, dtype


def _read_mlx(d: Path, meta: dict) -> Adapter:
    cfg = read_json(d / CONFIG)
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in ("lora", "dora"):
        raise ForgeError(f"{d / CONFIG}: fine_tune_type '{kind}' is not an adapter forge converts "
                         "(lora, dora)")
    mp.need(cfg, "num_layers", d / CONFIG, int)
    lp = cfg.get("lora_parameters")
    if not isinstance(lp, dict):
        raise ForgeError(f"{d / CONFIG}: missing 'lora_parameters' (rank, scale)")
    rank, scale = mp.need(lp, "rank", d / CONFIG, int), float(mp.need(lp, "scale", d / CONFIG))
    flat, dtype = _load_weights(d / WEIGHTS["mlx"])
    tensors, mags = mp.collect(flat, mp.parse_mlx_key, d / WEIGHTS["mlx"], transposed=True)
    for module, (a, _) in tensors.items():
        if a.shape[-2] != rank:
            raise ForgeError(f"{d / WEIGHTS['mlx']}: '{module}' has rank {a.shape[-2]}, "
                             f"adapter_config says {rank}")
    if (kind == "dora") != bool(mags):
        raise ForgeError(f"{d}: fine_tune_type is '{kind}' but the magnitude vectors (.m) are "
                         + ("present" if mags else "absent"))
    rslora = bool(meta.get("rslora", False))
    return Adapter(tensors, scale, rank, mp.alpha_for(scale, rank, rslora), rslora, magnitudes=mags,
                   dropout=float(lp.get("dropout", 0.0)), layout="mlx", dtype=dtype, source_config=cfg,
                   base_model=cfg.get("model"))


def _read_peft(d: Path, meta: dict) -> Adapter:
    cfg = read_json(d / CONFIG)
    mp.check_peft_config(cfg, d / CONFIG, forge_pissa=meta.get("init") == "pissa")
    r, alpha = mp.need(cfg, "r", d / CONFIG, int), float(mp.need(cfg, "lora_alpha", d / CONFIG))
    rslora = bool(cfg.get("use_rslora", False))
    flat, dtype = _load_weights(d / WEIGHTS["peft"])
    tensors, mags = mp.collect(flat, mp.parse_peft_key, d / WEIGHTS["peft"], transposed=False)
    scale = mp.scale_for(alpha, r, rslora)
    params = pe.full_paths(cfg.get("target_parameters") or [], tensors)
    wrappers = pe.wrapper_keys(params)  # a mixture's fused experts: their rank and scale go by parameter path

    def rank_of(name: str) -> int:
        return mp.peft_pattern_value(cfg.get("rank_pattern"), name, r)

    folded = {}
    for module, (a, b) in tensors.items():
        name = wrappers.get(module, module)
        r_m = rank_of(name)
        if module in wrappers:  # (E·R, in): checked by unfuse
            r_m = a.shape[0]
        if a.shape[0] != r_m:
            raise ForgeError(f"{d / WEIGHTS['peft']}: '{module}' has rank {a.shape[0]}, "
                             f"adapter_config says {r_m}")
        s_m = mp.scale_for(float(mp.peft_pattern_value(cfg.get("alpha_pattern"), name, alpha)), rank_of(name), rslora)
        # mlx-lm has one scale: fold this module's own scale into B (B·s_m/s keeps s·B·A = s_m·B·A)
        folded[module] = (a, b * np.float32(s_m / scale)) if s_m != scale else (a, b)
    if any(folded[m][1] is not tensors[m][1] for m in tensors):
        dtype = "float32"  # rescaled B is no longer exactly representable in a 16-bit source dtype
    if params:
        folded = pe.unfuse(folded, params, rank_of, _model_type(cfg, meta), d / CONFIG)
    return Adapter(folded, scale, r, alpha, rslora, magnitudes=mags,
                   dropout=float(cfg.get("lora_dropout", 0.0)), layout="peft", dtype=dtype, source_config=cfg,
                   base_model=cfg.get("base_model_name_or_path"))


def _apply_forge_meta(adapter: Adapter, meta: dict, d: Path) -> None:
    """Take init/base from forge.json; its rank, scale and rsLoRA flag must agree with the config."""
    if not meta:
        return
    where = d / FORGE
    if meta.get("init", "lora") not in ("lora", "pissa"):
        raise ForgeError(f"{where}: 'init' is {meta.get('init')!r}, expected lora or pissa")
    if "rank" in meta and meta["rank"] != adapter.rank:
        raise ForgeError(f"{where}: rank {meta['rank']} but {CONFIG} says {adapter.rank}")
    if "rslora" in meta and bool(meta["rslora"]) != adapter.rslora:
        raise ForgeError(f"{where}: rslora {meta['rslora']} but {CONFIG} says {adapter.rslora}")
    if "scale" in meta:
        if not math.isclose(float(meta["scale"]), adapter.scale, rel_tol=1e-6):
            raise ForgeError(f"{where}: scale {meta['scale']} but {CONFIG} gives {adapter.scale}")
        adapter.scale = float(meta["scale"])  # exact, where alpha/r may be one rounding off
    if "alpha" in meta:
        adapter.alpha = float(meta["alpha"])
    adapter.init = meta.get("init", "lora")
    adapter.base_model = meta.get("base_model") or adapter.base_model
    adapter.forge = meta


def _model_type(peft_cfg: dict, meta: dict) -> str | None:
    """The base's model_type, for the names of a mixture's experts: forge.json's, else the base's config.json when
    base_model_name_or_path is a local dir."""
    if meta.get("model_type"):
        return meta["model_type"]
    base = Path(str(peft_cfg.get("base_model_name_or_path") or "")) / "config.json"
    try:
        return json.loads(base.read_text()).get("model_type") if base.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _read_pissa_init(d: Path, adapter: Adapter) -> dict:
    path = d / PISSA
    if not path.exists():
        raise ForgeError(f"{d / FORGE}: init is pissa but {PISSA} is missing; without A0, B0 the adapter "
                         "cannot be applied to the original base model")
    flat, _ = _load_weights(path)
    mlx_style = all(mp.parse_mlx_key(k) for k in flat)  # forge_mlx writes mlx keys, forge_cuda PEFT keys
    parse = mp.parse_mlx_key if mlx_style else mp.parse_peft_key
    init, mags = mp.collect(flat, parse, path, transposed=mlx_style)
    params = [] if mlx_style else pe.full_paths(adapter.source_config.get("target_parameters") or [], init)
    if params:
        ranks = adapter.source_config.get("rank_pattern")
        init = pe.unfuse(init, params, lambda p: mp.peft_pattern_value(ranks, p, adapter.rank),
                         _model_type(adapter.source_config, adapter.forge), path)
    if mags or set(init) != set(adapter.tensors):
        raise ForgeError(f"{path}: must hold A0, B0 for exactly the adapter's {len(adapter.tensors)} modules")
    for m, (a0, b0) in init.items():
        a, b = adapter.tensors[m]
        if a0.shape != a.shape or b0.shape != b.shape:
            raise ForgeError(f"{path}: '{m}' A0 {a0.shape} B0 {b0.shape} != A {a.shape} B {b.shape}")
    return init


# ---- writing ------------------------------------------------------------------------------------

def _carried(adapter: Adapter, layout: str) -> dict | None:
    """The adapter_config.json this adapter last had in `layout` (lossless round trips)."""
    if adapter.layout == layout:
        return adapter.source_config
    conv = adapter.forge.get("converted_from") or {}
    return conv.get("adapter_config") if conv.get("layout") == layout else None


def write_files(adapter: Adapter, d: Path, layout: str, total_layers: int | None = None) -> None:
    """Weights, adapter_config.json, forge.json (+ pissa_init.safetensors) in `layout` into an existing dir.

    mlx-lm has one rank for all modules: lower-rank modules are zero-padded. PEFT keeps per-module
    ranks (rank_pattern). A PiSSA adapter is written in its forge form (see to_plain_lora).
    """
    tensors, init, dora = adapter.tensors, adapter.pissa_init, adapter.magnitudes is not None
    if layout == "mlx":
        r = max(a.shape[-2] for a, _ in tensors.values())
        tensors = {m: mp.pad_rank(a, b, r) for m, (a, b) in tensors.items()}
        init = {m: mp.pad_rank(a, b, r) for m, (a, b) in init.items()} if init else None
        derived = mp.mlx_config(tensors, r, adapter.scale, adapter.dropout, dora, total_layers)
        cfg = mp.keep_mlx_config(_carried(adapter, "mlx"), derived, tensors, total_layers)
    else:  # a mixture's expert stacks go to PEFT's LoRA on its fused expert parameters (peft_experts.py)
        model_type = adapter.forge.get("model_type")
        linear, fused, params = pe.fuse(tensors, model_type)
        tensors = {**linear, **fused}
        if init:
            init_linear, init_fused, _ = pe.fuse(init, model_type)
            init = {**init_linear, **init_fused}
        ranks = {m: a.shape[-2] for m, (a, _) in linear.items()}
        cfg = mp.peft_config(ranks, adapter.rank, adapter.scale, adapter.rslora, adapter.dropout, dora,
                             adapter.base_model, total_layers, params)
        if adapter.init == "pissa":
            cfg["init_lora_weights"] = "pissa"  # a forge PiSSA dir: NOT valid on the original base by itself
    meta = {"format": "mlx" if layout == "mlx" else "pt"}
    flat = mp.flatten(tensors, adapter.magnitudes, layout)
    sio.save(d / WEIGHTS[layout], flat, meta, as_dtype=adapter.dtype)
    write_json(d / CONFIG, cfg)
    write_json(d / FORGE, forge_meta(adapter, layout))
    if adapter.init == "pissa":
        sio.save(d / PISSA, mp.flatten(init, None, layout), meta, as_dtype=adapter.dtype)


def write_mlx_adapter(adapter: Adapter, path, total_layers: int | None = None) -> Path:
    """Write an mlx-lm (+ forge.json) adapter dir atomically; a PiSSA adapter keeps its forge form."""
    with atomic_dir(path) as tmp:
        write_files(adapter, tmp, "mlx", total_layers)
    return Path(path)


def write_peft_adapter(adapter: Adapter, path, total_layers: int | None = None) -> Path:
    """Write a PEFT (+ forge.json) adapter dir atomically; a PiSSA adapter keeps its forge form."""
    with atomic_dir(path) as tmp:
        write_files(adapter, tmp, "peft", total_layers)
    return Path(path)


# ---- a run's adapter: both backends write and read it here --------------------------------------

def save_trained(path, tensors: dict, magnitudes: dict | None, cfg, factors: dict, meta: dict, layout: str,
                 total_layers: int) -> Path:
    """A training run's adapter dir in the backend's layout (mlx-lm for forge_mlx, PEFT for forge_cuda): the
    canonical tensors, the run's forge.json (`meta`, forge_json.training_meta) and its PiSSA factors, atomically."""
    from forge_core.config import lora_scale

    adapter = Adapter(tensors, lora_scale(cfg.lora), cfg.lora.rank, cfg.lora.alpha, cfg.lora.rslora,
                      magnitudes=magnitudes, init="pissa" if factors else "lora",
                      pissa_init=dict(factors) if factors else None, dropout=cfg.lora.dropout, layout=layout,
                      forge=meta, base_model=cfg.model.path)
    writer = write_mlx_adapter if layout == "mlx" else write_peft_adapter
    return writer(adapter, path, total_layers=total_layers)


def read_trained(path) -> tuple:
    """(the run's config, its Adapter) of a forge adapter dir in either layout."""
    from forge_core.config_parse import from_dict

    d = forge_adapter_dir(path)
    adapter = read_adapter(d)
    if not isinstance(adapter.forge.get("config"), dict):
        raise ForgeError(f"{d / FORGE}: no 'config' (the training config); not written by forge train")
    return from_dict(adapter.forge["config"]), adapter
