"""The training methods Forge runs, one entry each: everything the CLI, the launch, the loop, the planner and the
demo need to know about a method lives in its Method row, and nothing else branches on a method's name. Adding a
method = one entry here (register() for one defined elsewhere, e.g. a test) + its objective class, which satisfies
forge_core/objectives/protocol.py's Objective.

    kind        the CLI command (`forge <kind>`; sft is `forge train`), RUN/forge.json's "kind", the objective
    section     the config section with its lr / beta / adapter ("" for sft: train.lr)
    rows        the shape of its data: "sft" (chat / text rows), "pairs" ({prompt, chosen, rejected}), "unpaired"
                ({prompt, completion, label}), "prompts" (prompts it samples completions for) - which loader
                reads them, how the planner sizes a batch, how the demo measures before and after
    sequences   sequences per example in the step's forward (2: chosen + rejected, concatenated)
    reference   scores its data once with the policy at init (the reference), before training
    samples     generates during training (the planner adds the sampling KV cache)
    objective   "module:Class" of its objective (imported when a run builds it), or the class itself
    options     its own CLI options: (flag, config key in its section, type, help; "choices" from the key's Literal,
                "multiple" for a repeatable one)
    check       "module:function(cfg)" run at launch, before the model is built (a reward that cannot load stops
                there), or None
    summary     one line, for `forge <kind> --help`
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from forge_core.errors import ForgeError


@dataclass(frozen=True)
class Option:
    flag: str  # --loss-type
    key: str  # its key in the method's config section (loss_type)
    type: type = str
    help: str = ""
    choices: bool = False  # offer the key's Literal values
    multiple: bool = False  # repeatable: a list


@dataclass(frozen=True)
class Method:
    kind: str
    section: str
    rows: str
    summary: str
    objective: object  # "module:Class" or the class
    sequences: int = 1
    reference: bool = False
    samples: bool = False
    options: tuple[Option, ...] = field(default_factory=tuple)
    check: str | None = None

    @property
    def command(self) -> str:
        return "train" if self.kind == "sft" else self.kind

    def objective_class(self):
        return _load(self.objective)

    def run_checks(self, cfg) -> None:
        if self.check:
            _load(self.check)(cfg)


ROWS = ("sft", "pairs", "unpaired", "prompts")
_LOSS_TYPE = Option("--loss-type", "loss_type", choices=True)

METHODS: dict[str, Method] = {m.kind: m for m in (
    Method("sft", "", "sft", "Supervised fine-tuning (LoRA / PiSSA / QPiSSA).", "forge_core.objectives.sft:SFTObjective"),
    Method("dpo", "dpo", "pairs",
           "Direct preference optimisation on {prompt, chosen, rejected} rows, against the policy at init.",
           "forge_core.objectives.dpo:DPOObjective", sequences=2, reference=True, options=(_LOSS_TYPE,)),
    Method("orpo", "orpo", "pairs",
           "ORPO on {prompt, chosen, rejected} rows: NLL + odds-ratio term, no reference, one phase from the base.",
           "forge_core.objectives.reference_free:ReferenceFreeObjective", sequences=2),
    Method("simpo", "simpo", "pairs",
           "SimPO on {prompt, chosen, rejected} rows: length-normalised reward with a target margin, no reference.",
           "forge_core.objectives.reference_free:ReferenceFreeObjective", sequences=2,
           options=(Option("--gamma", "gamma", float, "Target reward margin."),)),
    Method("cpo", "cpo", "pairs", "CPO on {prompt, chosen, rejected} rows: log-prob reward + NLL on chosen, no reference.",
           "forge_core.objectives.reference_free:ReferenceFreeObjective", sequences=2, options=(_LOSS_TYPE,)),
    Method("kto", "kto", "unpaired",
           "KTO on {prompt, completion, label} rows (pairs are split), against the policy at init.",
           "forge_core.objectives.kto:KTOObjective", reference=True,
           options=(_LOSS_TYPE, Option("--desirable-weight", "desirable_weight", float),
                    Option("--undesirable-weight", "undesirable_weight", float))),
    Method("grpo", "grpo", "prompts",
           "GRPO on {prompt, ...} rows: samples completions, scores them with reward functions, reinforces the better.",
           "forge_core.objectives.grpo:GRPOObjective", samples=True, check="forge_core.objectives.grpo:check_launch",
           options=(
               Option("--reward", "rewards", str, "A reward function (repeat for several, summed): your own "
                      "fn(prompts, completions, **columns) -> list of floats, or builtin:valid_json, "
                      "json_fields[:COL], exact[:COL], regex:PATTERN, length:N.", multiple=True),
               Option("--reward-weight", "reward_weights", float, "One weight per --reward, in order (default 1 each).",
                      multiple=True),
               Option("--num-generations", "num_generations", int, "Completions sampled per prompt (G)."),
               Option("--max-new-tokens", "max_new_tokens", int, "Longest completion sampled."),
               Option("--temperature", "temperature", float), Option("--top-p", "top_p", float),
               _LOSS_TYPE, Option("--scale-rewards", "scale_rewards", choices=True),
               Option("--epsilon", "epsilon", float), Option("--epsilon-high", "epsilon_high", float),
               Option("--num-iterations", "num_iterations", int, "Optimizer steps per generation (μ)."))),
)}
KINDS = tuple(METHODS)


def register(m: Method) -> Method:
    """Add a method defined outside this table (a plugin, a test). Its kind must be new and its rows one of ROWS."""
    if m.kind in METHODS:
        raise ForgeError(f"method '{m.kind}' is already registered")
    if m.rows not in ROWS:
        raise ForgeError(f"method '{m.kind}': rows '{m.rows}' is not one of {', '.join(ROWS)}")
    METHODS[m.kind] = m
    return m


def method(kind: str) -> Method:
    if kind not in METHODS:
        raise ForgeError(f"unknown method '{kind}' (methods: {', '.join(METHODS)})")
    return METHODS[kind]


def section(cfg, kind: str):
    """The method's config section (None for sft)."""
    m = method(kind)
    return getattr(cfg, m.section) if m.section else None


def start_adapter(cfg, kind: str) -> str:
    """The SFT adapter a preference run continues from ("" = start from the base)."""
    sec = section(cfg, kind)
    return sec.adapter if sec is not None else ""


def _load(spec):
    if not isinstance(spec, str):
        return spec
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)
