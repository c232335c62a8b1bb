"""Expert adapters in PEFT's layout: LoRA on transformers 5's fused expert parameters (`target_parameters`).

transformers 5 keeps a block's experts as two 3-D parameters of one module `<block>.mlp.experts`: gate_up_proj
(E, 2i, h) - gate then up on the output axis - and down_proj (E, h, i). PEFT wraps each targeted parameter in a
ParamWrapper, nested in the order the module registers them (gate_up_proj inside, as `experts.base_layer`, when both
are targeted; down_proj outside, as `experts`), each with one LoRA per expert of rank R stored as

    lora_A.weight (E·R, in)    rows e·R + k       = A_e[k]
    lora_B.weight (out, R·E)   column k·E + e     = B_e[:, k]            (peft ParamWrapper.get_delta_factors)

forge's canonical form (mlx-lm's SwitchGLU) keeps gate_proj and up_proj apart, each (E, r, in) / (E, out, r). The
fused gate_up adapter of a gate (rank rg) and an up (rank ru) adapter is exact at rank rg + ru:
    A = [A_gate; A_up]  (rg + ru, h)        B = [[B_gate, 0], [0, B_up]]  (2i, rg + ru)
and reading one back splits it the same way when B is block-diagonal (forge's own), else gives gate and up the
whole fused rank (any PEFT adapter, exact too).
"""

from __future__ import annotations

import re

import numpy as np

from forge_core.errors import ForgeError
from forge_core.models.architectures import architecture
from forge_core.models.experts import is_router

PARAMS = ("gate_up_proj", "down_proj")  # the order transformers 5 registers them: PEFT's nesting order
_STACK = re.compile(r"^(.*\.layers\.\d+)\.([^.]+)\.switch_mlp\.(gate_proj|up_proj|down_proj)$")


def _torch_moe(model_type: str | None) -> str:
    experts = architecture(model_type).experts
    return experts.torch_moe if experts else "mlp"


def fuse(tensors: dict, model_type: str | None) -> tuple[dict, dict, dict]:
    """Canonical {module: (A, B)} -> (the linears' {module: (A, B)}, {PEFT module key: (lora_A (E·R, in),
    lora_B (out, R·E))} of the expert parameters, {parameter path: R}). The parameter path is what PEFT's
    target_parameters and rank_pattern name: `<block>.mlp.experts.gate_up_proj`."""
    linear, stacks = {}, {}
    for module, pair in tensors.items():
        m = _STACK.match(module) if pair[0].ndim == 3 else None
        if m is None and is_router(model_type, module):
            raise ForgeError(f"'{module}' is the router of a mixture of experts: transformers keeps it as a "
                             "parameter, not a linear, so PEFT cannot apply this LoRA; keep the adapter in the mlx "
                             "layout (forge convert --to mlx)")
        if m is None:
            linear[module] = pair
        else:
            stacks.setdefault(m.group(1), {})[m.group(3)] = pair
    flat, ranks = {}, {}
    for block, projs in sorted(stacks.items()):
        module = f"{block}.{_torch_moe(model_type)}.experts"
        fused = {}
        if "gate_proj" in projs or "up_proj" in projs:
            fused["gate_up_proj"] = _gate_up(projs.get("gate_proj"), projs.get("up_proj"))
        if "down_proj" in projs:
            fused["down_proj"] = projs["down_proj"]
        keys = {path: key for key, path in wrapper_keys([f"{module}.{p}" for p in fused]).items()}
        for param, (a, b) in fused.items():
            e, r = a.shape[:2]
            flat[keys[f"{module}.{param}"]] = (a.reshape(e * r, -1),
                                                np.ascontiguousarray(b.transpose(1, 2, 0).reshape(b.shape[1], r * e)))
            ranks[f"{module}.{param}"] = r
    return linear, flat, ranks


def _gate_up(gate, up):
    """The fused gate_up adapter (A (E, rg + ru, h), B (E, 2i, rg + ru)) of separate gate and up ones (a missing one:
    zeros of the other's rank, A and B both, which is how unfuse tells it was missing)."""
    like = gate if gate is not None else up
    e, r, h = like[0].shape
    width = like[1].shape[1]
    zero = (np.zeros((e, r, h), np.float32), np.zeros((e, width, r), np.float32))
    (ag, bg), (au, bu) = gate if gate is not None else zero, up if up is not None else zero
    b = np.zeros((e, 2 * width, ag.shape[1] + au.shape[1]), np.float32)
    b[:, :width, :ag.shape[1]], b[:, width:, ag.shape[1]:] = bg, bu
    return np.concatenate([ag, au], axis=1), b


def wrapper_keys(target_parameters: list[str]) -> dict[str, str]:
    """{PEFT module key of a parameter wrapper: the parameter path it adapts}: `<m>.base_layer` -> `<m>.gate_up_proj`
    and `<m>` -> `<m>.down_proj` when both are targeted."""
    by_module: dict[str, list[str]] = {}
    for path in target_parameters:
        module, _, param = path.rpartition(".")
        by_module.setdefault(module, []).append(param)
    keys = {}
    for module, params in by_module.items():
        targeted = [p for p in PARAMS if p in params] + [p for p in params if p not in PARAMS]
        for i, param in enumerate(targeted):
            keys[module + ".base_layer" * (len(targeted) - 1 - i)] = f"{module}.{param}"
    return keys


def unfuse(tensors: dict, target_parameters: list[str], rank_of, model_type: str | None, where) -> dict:
    """Inverse of fuse on what a PEFT adapter holds: the 2-D tensors of the parameter wrappers (keys `<module>` and
    `<module>.base_layer...`) -> canonical expert stacks; the linears pass through. `rank_of(param path)`: R."""
    experts = architecture(model_type).experts
    if experts is None:
        raise ForgeError(f"{where}: LoRA on expert parameters ({target_parameters[0]}), but the base's model type "
                         f"{model_type!r} is not a mixture of experts forge knows; pass --base with the model")
    out = dict(tensors)
    for key, path in wrapper_keys(full_paths(target_parameters, tensors)).items():
        module, _, param = path.rpartition(".")
        if param not in PARAMS or not module.endswith(f".{experts.torch_moe}.experts"):
            raise ForgeError(f"{where}: target_parameters '{path}': forge converts LoRA on "
                             f"<block>.{experts.torch_moe}.experts.gate_up_proj / down_proj only")
        if key not in out:
            raise ForgeError(f"{where}: no LoRA tensors for '{path}' (expected under '{key}')")
        a2, b2 = out.pop(key)
        r = rank_of(path)
        if a2.shape[0] % r or b2.shape[1] != a2.shape[0]:
            raise ForgeError(f"{where}: '{key}': lora_A {a2.shape} / lora_B {b2.shape} do not hold rank {r} per "
                             "expert")
        e = a2.shape[0] // r
        a = a2.reshape(e, r, -1)
        b = np.ascontiguousarray(b2.reshape(b2.shape[0], r, e).transpose(2, 0, 1))
        stack = f"{module[: -len(f'.{experts.torch_moe}.experts')]}.{experts.moe}.switch_mlp"
        if param == "down_proj":
            out[f"{stack}.down_proj"] = (a, b)
        else:
            out.update(_split_gate_up(a, b, stack))
    return out


def _split_gate_up(a, b, stack: str) -> dict:
    """gate and up adapters of a fused gate_up one: forge's own (block-diagonal B, each half of the rank) split back
    exactly, a side fuse padded with zeros (A and B all zero) dropped; any other (PEFT's own) split by output rows,
    each side keeping the whole rank."""
    width, r = b.shape[1] // 2, a.shape[1]
    half = r // 2
    if r % 2 == 0 and not b[:, :width, half:].any() and not b[:, width:, :half].any():
        sides = {"gate_proj": (a[:, :half], b[:, :width, :half]), "up_proj": (a[:, half:], b[:, width:, half:])}
        return {f"{stack}.{p}": ab for p, ab in sides.items() if ab[0].any() or ab[1].any()}
    return {f"{stack}.gate_proj": (a, b[:, :width]), f"{stack}.up_proj": (a, b[:, width:])}


def full_paths(target_parameters: list[str], tensors: dict) -> list[str]:
    """PEFT's target_parameters as full parameter paths: PEFT also takes a suffix (`mlp.experts.gate_up_proj`,
    matched at a dot boundary) - each becomes the paths of the wrapped modules the adapter's tensors show."""
    modules = {k.replace(".base_layer", "") for k in tensors}
    full = []
    for target in target_parameters:
        owner, _, param = target.rpartition(".")
        hits = [f"{m}.{param}" for m in sorted(modules) if m == owner or m.endswith(f".{owner}")]
        full += hits or [target]  # none: unfuse names the missing tensors
    return list(dict.fromkeys(full))
