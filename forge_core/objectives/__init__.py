"""What the loop optimises, written once for both backends: data, loss (through the backend's tensor ops),
eval. sft.py: token NLL; pairs.py: what the pair methods share; dpo.py: the DPO family against the policy at
init (reference.py); reference_free.py: ORPO, SimPO, CPO; kto.py: KTO on unpaired rows; grpo.py: GRPO on
completions it samples. protocol.py: what the loop needs of each (every registered method's objective passes
tests/forge_core/test_objective_contract.py)."""

from __future__ import annotations

from forge_core.distributed import World
from forge_core.methods import method


def build(kind: str, cfg, ops, model, tokenizer, run, console, world: World | None = None):
    """The objective of method `kind` (forge_core/methods.py), built the one way every objective is."""
    return method(kind).objective_class()(kind, cfg, ops, model, tokenizer, run, console, world or World())
