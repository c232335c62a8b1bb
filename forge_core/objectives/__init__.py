"""What the loop optimises, written once for both backends: data, loss (through the backend's tensor ops),
eval. sft.py: token NLL; pairs.py: what the pair methods share; dpo.py: the DPO family against the policy at
init (reference.py); reference_free.py: ORPO, SimPO, CPO; kto.py: KTO on unpaired rows; grpo.py: GRPO on
completions it samples."""

from __future__ import annotations

from forge_core.distributed import World
from forge_core.methods import method
from forge_core.objectives.dpo import DPOObjective
from forge_core.objectives.grpo import GRPOObjective
from forge_core.objectives.kto import KTOObjective
from forge_core.objectives.reference_free import ReferenceFreeObjective
from forge_core.objectives.sft import SFTObjective


def build(kind: str, cfg, ops, model, tokenizer, run, console, world: World | None = None):
    world = world or World()
    method(kind)  # an unknown kind is named here
    if kind == "sft":
        return SFTObjective(cfg, ops, model, tokenizer, console, world)
    if kind == "dpo":
        return DPOObjective(cfg, ops, model, tokenizer, run, console, world)
    if kind == "kto":
        return KTOObjective(cfg, ops, model, tokenizer, run, console, world)
    if kind == "grpo":
        return GRPOObjective(cfg, ops, model, tokenizer, run, console, world)
    return ReferenceFreeObjective(kind, cfg, ops, model, tokenizer, console, world)
