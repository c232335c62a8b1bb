"""What the loop optimises, written once for both backends: data, loss (through the backend's tensor
ops), eval. sft.py: token NLL; dpo.py: the DPO family against a reference scored once at init."""

from __future__ import annotations

from forge_core.distributed import World
from forge_core.objectives.dpo import DPOObjective
from forge_core.objectives.sft import SFTObjective

KINDS = ("sft", "dpo")


def build(kind: str, cfg, ops, model, tokenizer, run, console, world: World | None = None):
    world = world or World()
    if kind == "sft":
        return SFTObjective(cfg, ops, model, tokenizer, console, world)
    if kind == "dpo":
        return DPOObjective(cfg, ops, model, tokenizer, run, console, world)
    raise ValueError(f"unknown objective {kind!r}; one of {KINDS}")
