"""Names and configs of the two adapter layouts, as plain mappings (no I/O).

    canonical module path      model.layers.3.self_attn.q_proj       (HF name; mlx-lm keeps HF names)
    mlx-lm tensor keys         <module>.lora_a (in, r)   <module>.lora_b (r, out)   <module>.m (out,)
    PEFT tensor keys           base_model.model.<module>.lora_A.weight (r, in)
                               base_model.model.<module>.lora_B.weight (out, r)
                               base_model.model.<module>.lora_magnitude_vector (out,)
    canonical tensors          A (r, in) = lora_A.weight = lora_a.T,   B (out, r) = lora_B.weight = lora_b.T

An expert stack (mlx-lm's SwitchLinear: every expert of a mixture-of-experts MLP in one (E, out, in) weight) has one
LoRA per expert: canonical A (E, r, in), B (E, out, r), which is also mlx-lm's LoRASwitchLinear layout (lora_a, lora_b
NOT transposed). Every formula here reads the rank on A's axis -2 and B's axis -1, so both shapes go through it.

Scale: mlx-lm stores `scale` itself; PEFT stores lora_alpha and divides by r (by sqrt(r) with use_rslora).
mlx-lm wraps the LAST `num_layers` blocks (-1: all) with one rank and scale for every listed key.
"""

from __future__ import annotations

import math
import re

import numpy as np

from forge_core.errors import ForgeError

PEFT_PREFIX = "base_model.model."
MLX_KINDS = {"lora_a": "A", "lora_b": "B", "m": "m"}
PEFT_KINDS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}
_MLX_LEAF = {kind: leaf for leaf, kind in MLX_KINDS.items()}
_PEFT_LEAF = {kind: leaf for leaf, kind in PEFT_KINDS.items()}
_LAYER = re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$")


def parse_mlx_key(key: str) -> tuple[str, str] | None:
    """'model.layers.0.q_proj.lora_a' -> ('model.layers.0.q_proj', 'A'); None if not a LoRA key."""
    module, _, leaf = key.rpartition(".")
    return (module, MLX_KINDS[leaf]) if module and leaf in MLX_KINDS else None


def parse_peft_key(key: str) -> tuple[str, str] | None:
    if not key.startswith(PEFT_PREFIX):
        return None
    rest = key[len(PEFT_PREFIX):]
    for suffix, kind in PEFT_KINDS.items():
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], kind
    return None


def mlx_key(module: str, kind: str) -> str:
    return f"{module}.{_MLX_LEAF[kind]}"


def peft_key(module: str, kind: str) -> str:
    return f"{PEFT_PREFIX}{module}.{_PEFT_LEAF[kind]}"


def split_layer(module: str) -> tuple[int, str] | None:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'); None for modules outside the blocks."""
    m = _LAYER.match(module)
    return (int(m.group(1)), m.group(2)) if m else None


def alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """PEFT's lora_alpha giving this scale: scale = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return scale * (math.sqrt(rank) if rslora else rank)


def scale_for(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


# ---- flat tensor dicts <-> canonical {module: (A, B)} ----------------------------------------------

def mlx_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Canonical (A, B) <-> mlx-lm's (lora_a, lora_b), both ways: transposed for a linear, as they are for an expert
    stack (LoRASwitchLinear keeps (E, r, in) and (E, out, r))."""
    return (a.T, b.T) if a.ndim == 2 else (a, b)


def collect(flat: dict, parse, where, transposed: bool) -> tuple[dict, dict | None]:
    """Flat {key: array} -> ({module: (A, B)}, {module: m} or None). transposed: keys hold mlx-lm's layout."""
    parts: dict[str, dict] = {}
    for key, arr in flat.items():
        p = parse(key)
        if p is None:
            raise ForgeError(f"{where}: unknown tensor '{key}' (forge converts LoRA/DoRA on linear "
                             "layers only)")
        parts.setdefault(p[0], {})[p[1]] = arr
    tensors, mags = {}, {}
    for module, t in sorted(parts.items()):
        if "A" not in t or "B" not in t:
            raise ForgeError(f"{where}: module '{module}' has {sorted(t)} but needs both A and B")
        a, b = mlx_pair(t["A"], t["B"]) if transposed else (t["A"], t["B"])
        if a.ndim not in (2, 3) or b.ndim != a.ndim or a.shape[-2] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
            raise ForgeError(f"{where}: module '{module}': A {a.shape} and B {b.shape} do not share a rank")
        tensors[module] = (np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
        if "m" in t:
            if b.ndim != 2 or t["m"].shape != (b.shape[0],):
                raise ForgeError(f"{where}: module '{module}': magnitude {t['m'].shape} != ({b.shape[0]},)")
            mags[module] = np.asarray(t["m"], np.float32)
    if mags and set(mags) != set(tensors):
        missing = min(set(tensors) - set(mags))
        raise ForgeError(f"{where}: DoRA magnitudes present for some modules but not for {missing}")
    return tensors, mags or None


def pad_rank(a: np.ndarray, b: np.ndarray, r: int):
    """Zero rows of A / columns of B up to rank r: B·A is unchanged."""
    k = r - a.shape[-2]
    lead = [(0, 0)] * (a.ndim - 2)
    return (a, b) if k == 0 else (np.pad(a, [*lead, (0, k), (0, 0)]), np.pad(b, [*lead, (0, 0), (0, k)]))


def flatten(tensors: dict, magnitudes: dict | None, layout: str) -> dict:
    """Canonical {module: (A, B)} (+ DoRA magnitudes) -> the layout's flat {key: array}."""
    key, mlx = (mlx_key, True) if layout == "mlx" else (peft_key, False)
    flat = {}
    for m, (a, b) in tensors.items():
        if a.ndim == 3 and not mlx:
            raise ForgeError(f"'{m}' holds one LoRA per expert of a mixture of experts: forge writes those in "
                             "mlx-lm's layout only for now; keep the adapter in the mlx layout")
        flat[key(m, "A")], flat[key(m, "B")] = mlx_pair(a, b) if mlx else (a, b)
    for m, mag in (magnitudes or {}).items():
        flat[key(m, "m")] = mag
    return flat


# ---- mlx-lm adapter_config.json ----------------------------------------------------------------

def mlx_keys(modules) -> list[str]:
    """mlx-lm `keys`: paths inside a block for block modules, the full path for others (e.g. lm_head)."""
    return sorted({(split_layer(m) or (None, m))[1] for m in modules})


def mlx_num_layers(layers: list[int], total_layers: int | None) -> int:
    """Blocks counted from the end that cover every adapted block. Unknown depth: -1 (all blocks).

    mlx-lm wraps every listed key in those blocks; blocks without tensors keep lora_b = 0 (or, for
    DoRA, m = ||W||), so the extra wrappers change nothing.
    """
    if not layers or total_layers is None:
        return -1
    return total_layers - min(layers)


def mlx_config(modules, rank: int, scale: float, dropout: float, dora: bool,
               total_layers: int | None) -> dict:
    layers = sorted({s[0] for m in modules if (s := split_layer(m))})
    return {
        "fine_tune_type": "dora" if dora else "lora",
        "num_layers": mlx_num_layers(layers, total_layers),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout, "keys": mlx_keys(modules)},
    }


def keep_mlx_config(carried: dict | None, derived: dict, modules, total_layers: int | None) -> dict:
    """The carried (original) mlx-lm config when it describes these tensors exactly as `derived` does.

    This makes mlx -> PEFT -> mlx lossless (the training arguments mlx-lm stores ride along); anything
    that changed - rank, scale, dropout, DoRA, keys or blocks covered - falls back to `derived`.
    """
    if not isinstance(carried, dict) or not isinstance(carried.get("lora_parameters"), dict):
        return derived
    lp, dlp = carried["lora_parameters"], derived["lora_parameters"]
    same = (carried.get("fine_tune_type", "lora") == derived["fine_tune_type"]
            and lp.get("rank") == dlp["rank"] and lp.get("scale") == dlp["scale"]
            and lp.get("dropout", 0.0) == dlp["dropout"]
            and (lp.get("keys") is None or set(lp["keys"]) >= set(dlp["keys"])))
    layers = [s[0] for m in modules if (s := split_layer(m))]
    n = carried.get("num_layers")
    if not same or not isinstance(n, int):
        return derived
    if layers and n >= 0:
        need = (total_layers - min(layers)) if total_layers else (max(layers) - min(layers) + 1)
        if n < need:
            return derived
    return carried


# ---- PEFT adapter_config.json -------------------------------------------------------------------

def peft_pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): first key whose
    regex matches the end of the module path at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_targets(modules, total_layers: int | None) -> tuple[list[str] | str, list[int] | None]:
    """target_modules and layers_to_transform selecting exactly `modules`.

    Block modules forming a full (blocks x names) grid -> a list of names + the block list (None when it
    is every block of a model of known depth). Anything else -> one regex PEFT full-matches per module.
    """
    split = {m: split_layer(m) for m in modules}
    rels = sorted({s[1] for s in split.values() if s})
    layers = sorted({s[0] for s in split.values() if s})
    grid = {(n, r) for n in layers for r in rels}
    if all(split.values()) and grid == set(split.values()):
        leaves = {r.rsplit(".", 1)[-1] for r in rels}
        names = sorted(leaves) if len(leaves) == len(rels) else rels  # leaf names when unambiguous
        every = total_layers is not None and layers == list(range(total_layers))
        return names, None if every else layers
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")", None


def peft_config(ranks: dict[str, int], rank: int, scale: float, rslora: bool, dropout: float, dora: bool,
                base_model: str | None, total_layers: int | None, params: dict[str, int] | None = None) -> dict:
    """A LoraConfig dict PEFT loads unmodified. Modules whose rank differs from `rank` go to rank_pattern,
    with alpha_pattern keeping every module at the same `scale`. `params`: {parameter path: rank} of LoRA on
    parameters (a mixture's fused experts, peft_experts.py), PEFT's target_parameters by their full paths."""
    rank_pattern = {re.escape(m): r for m, r in sorted({**ranks, **(params or {})}.items()) if r != rank}
    alpha_pattern = {k: alpha_for(scale, r, rslora) for k, r in rank_pattern.items()}
    targets, layers = peft_targets(ranks, total_layers) if ranks else ([], None)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha_for(scale, rank, rslora),
        "lora_dropout": 0.0 if params else dropout,  # PEFT's parameter LoRA refuses dropout (inference: none)
        "target_modules": targets,
        "layers_to_transform": layers,
        "bias": "none",
        "use_rslora": rslora,
        "use_dora": dora,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "inference_mode": True,
        "target_parameters": sorted(params) if params else None,
    }


# PEFT config values whose adapters forge cannot express in mlx-lm / as a plain delta.
PEFT_UNSUPPORTED = {
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None,),
    "alora_invocation_tokens": (None,),
    "use_qalora": (False, None),
}
# init_lora_weights values that rewrite the BASE weights: the saved A, B apply to a changed base.
PEFT_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def need(cfg: dict, key: str, where, typ=(int, float)):
    """cfg[key], which must be a number (or `typ`); else a ForgeError naming the file and key."""
    if key not in cfg or isinstance(cfg[key], bool) or not isinstance(cfg[key], typ):
        raise ForgeError(f"{where}: missing or invalid '{key}' (needed to apply the adapter)")
    return cfg[key]


def check_peft_config(cfg: dict, where, forge_pissa: bool = False) -> None:
    """Refuse PEFT configs whose adapters are not plain LoRA/DoRA deltas on linear layers of the base."""
    if cfg.get("peft_type") != "LORA":
        raise ForgeError(f"{where}: peft_type is {cfg.get('peft_type')!r}; forge converts LORA adapters only")
    for key, ok in PEFT_UNSUPPORTED.items():
        if cfg.get(key, ok[0]) not in ok:
            raise ForgeError(f"{where}: '{key}': {cfg[key]!r} is not supported (forge converts plain "
                             "LoRA/DoRA on linear layers)")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(PEFT_MUTATING_INITS) and not forge_pissa:
        raise ForgeError(f"{where}: init_lora_weights '{init}' changed the base weights, so these "
                         "tensors only apply to that changed base; save it from PEFT with "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=<dir of the adapter "
                         "at init>) to get a plain LoRA")
