"""Expert stacks by name, framework-free: the checkpoint's per-expert weights (`...experts.3.w1.weight`) and the
stack forge's adapters name (`...switch_mlp.gate_proj`, mlx-lm's), from the architecture table's `experts` row.
The converter checks an adapter's expert modules against a base through it, and the merged export writes each
expert's merged weight back under its own name."""

from __future__ import annotations

import re

from forge_core.models.architectures import architecture

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")  # mlx-lm's SwitchGLU


def expert_weight(model_type: str | None, name: str) -> tuple[str, int] | None:
    """'model.layers.0.block_sparse_moe.experts.3.w1.weight' (Mixtral) -> ('model.layers.0.block_sparse_moe.
    switch_mlp.gate_proj', 3): the stack it belongs to and its expert; None for any other weight."""
    experts = architecture(model_type).experts
    if experts is None:
        return None
    m = re.match(rf"^(.*\.{re.escape(experts.moe)})\.experts\.(\d+)\.([^.]+)\.weight$", name)
    if not m or m.group(3) not in experts.names:
        return None
    return f"{m.group(1)}.switch_mlp.{PROJECTIONS[experts.names.index(m.group(3))]}", int(m.group(2))


def stack_shapes(model_type: str | None, shapes: dict[str, tuple]) -> dict[str, tuple[int, int, int]]:
    """{stack module: (E, out, in)} from the checkpoint's {weight name: shape}."""
    found: dict[str, dict[int, tuple]] = {}
    for name, shape in shapes.items():
        hit = expert_weight(model_type, name)
        if hit and len(shape) == 2:
            found.setdefault(hit[0], {})[hit[1]] = tuple(shape)
    return {m: (len(per), *per[0]) for m, per in found.items() if sorted(per) == list(range(len(per)))}


def _stack(path: str, moe: str) -> re.Match | None:
    return re.match(rf"^(.*\.layers\.\d+)\.{re.escape(moe)}\.(?:switch_mlp|experts)\.({'|'.join(PROJECTIONS)})$", path)


def canonical_path(model_type: str | None, torch_path: str) -> str:
    """forge_cuda's `<block>.mlp.experts.gate_proj` -> the adapters' `<block>.<moe>.switch_mlp.gate_proj`; any other
    path as it is."""
    experts = architecture(model_type).experts
    m = _stack(torch_path, experts.torch_moe) if experts else None
    return f"{m.group(1)}.{experts.moe}.switch_mlp.{m.group(2)}" if m and ".experts." in torch_path else torch_path


def torch_path(model_type: str | None, canonical: str) -> str:
    """Inverse of canonical_path."""
    experts = architecture(model_type).experts
    m = _stack(canonical, experts.moe) if experts else None
    return f"{m.group(1)}.{experts.torch_moe}.experts.{m.group(2)}" if m and ".switch_mlp." in canonical else canonical


def is_router(model_type: str | None, path: str) -> bool:
    """`<block>.<moe>.<router>`: the router of a mixture (MLX keeps it in full precision, as torch does)."""
    experts = architecture(model_type).experts
    return bool(experts) and re.match(rf"^.*\.layers\.\d+\.{re.escape(experts.moe)}\.{re.escape(experts.router)}$",
                                      path) is not None
