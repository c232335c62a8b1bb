"""What forge needs to know about an architecture, one row per model_type: both backends and the memory planner read
this table, so a new architecture (or a quirk found in one) is one entry here, not an edit per file.

    split_head   logits = head(body(x)) and nothing more - no soft-capping, logit scaling or extra terms - in
                 transformers 5's *ForCausalLM.forward and in mlx-lm's Model.__call__ (checked: transformers 5.25,
                 mlx-lm 0.32). Only these run the vocabulary head at the trained positions alone, chunked
                 (forge_mlx/head.py, forge_cuda/head.py), and the planner plans that head; the others (gemma2 and
                 gemma3 soft-cap, granite and cohere scale) compute, and are planned with, their logits at every
                 position.
    packing      forge_mlx can pack rows into one sequence (forge_mlx/packing.py: mlx-lm's llama-style attention
                 with a `rope` module it can wrap); torch packs any model through its position ids.
    experts      a mixture of experts: where the checkpoint keeps them (forge_core/models/experts.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Experts:
    """A block's mixture of experts as the Hub checkpoint stores it - `<block>.<moe>.experts.<e>.<name>.weight`, one
    (out, in) weight per expert, `names` those of (gate_proj, up_proj, down_proj) - and as mlx-lm stacks it:
    `<block>.<moe>.switch_mlp.<gate_proj|up_proj|down_proj>`, one (E, out, in) weight, the path forge's adapters
    name."""

    moe: str
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    router: str = "gate"  # <block>.<moe>.<router>: (E, h), kept in full precision
    torch_moe: str = "mlp"  # transformers 5's name for <moe> (it renamed Mixtral's block_sparse_moe)


@dataclass(frozen=True)
class Architecture:
    split_head: bool = False
    packing: bool = False
    experts: Experts | None = None


ARCHITECTURES = {
    "llama": Architecture(split_head=True, packing=True),
    "mistral": Architecture(split_head=True, packing=True),
    "qwen2": Architecture(split_head=True, packing=True),
    "qwen3": Architecture(split_head=True, packing=True),
    "phi3": Architecture(split_head=True),
    "smollm3": Architecture(split_head=True),
    "gemma": Architecture(split_head=True),
    "olmo2": Architecture(split_head=True),
    "starcoder2": Architecture(split_head=True),
    # mixtures of experts (their router's aux loss is off by default: the head still splits)
    "mixtral": Architecture(split_head=True, experts=Experts("block_sparse_moe", ("w1", "w3", "w2"))),
    "qwen3_moe": Architecture(split_head=True, experts=Experts("mlp")),
    "olmoe": Architecture(split_head=True, experts=Experts("mlp")),
}
UNKNOWN = Architecture()


def architecture(model_type: str | None) -> Architecture:
    """The row of `model_type`; an architecture not in the table gets the safe answers (whole logits, no MLX
    packing)."""
    return ARCHITECTURES.get(model_type or "", UNKNOWN)
