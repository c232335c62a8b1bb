"""The training methods Forge runs, one row each: what the launcher, the loop, the planner and the CLI need to
know about a method, kept in one table (the objectives themselves live in forge_core/objectives/)."""

from __future__ import annotations

from dataclasses import dataclass

from forge_core.errors import ForgeError


@dataclass(frozen=True)
class Method:
    kind: str  # the objective, the CLI command and RUN/forge.json's "kind"
    section: str  # the config section with its lr / beta / adapter ("" for sft: train.lr)
    sequences: int  # sequences per example in the step's forward (2: chosen + rejected, concatenated)
    reference: bool  # scores its data once with the policy at init (the reference)
    summary: str  # one line, for `forge <kind> --help`


METHODS = {m.kind: m for m in (
    Method("sft", "", 1, False, "Supervised fine-tuning (LoRA / PiSSA / QPiSSA)."),
    Method("dpo", "dpo", 2, True,
           "Direct preference optimisation on {prompt, chosen, rejected} rows, against the policy at init."),
    Method("orpo", "orpo", 2, False,
           "ORPO on {prompt, chosen, rejected} rows: NLL + odds-ratio term, no reference, one phase from the base."),
    Method("simpo", "simpo", 2, False,
           "SimPO on {prompt, chosen, rejected} rows: length-normalised reward with a target margin, no reference."),
    Method("cpo", "cpo", 2, False, "CPO on {prompt, chosen, rejected} rows: log-prob reward + NLL on chosen, no reference."),
    Method("kto", "kto", 1, True, "KTO on {prompt, completion, label} rows (pairs are split), against the policy at init."),
    Method("grpo", "grpo", 1, False,
           "GRPO on {prompt, ...} rows: samples completions, scores them with reward functions, reinforces the better."),
)}
KINDS = tuple(METHODS)


def method(kind: str) -> Method:
    if kind not in METHODS:
        raise ForgeError(f"unknown method '{kind}' (methods: {', '.join(KINDS)})")
    return METHODS[kind]


def section(cfg, kind: str):
    """The method's config section (None for sft)."""
    m = method(kind)
    return getattr(cfg, m.section) if m.section else None


def start_adapter(cfg, kind: str) -> str:
    """The SFT adapter a preference run continues from ("" = start from the base)."""
    sec = section(cfg, kind)
    return sec.adapter if sec is not None else ""
