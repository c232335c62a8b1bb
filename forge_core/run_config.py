"""The config a run uses, resolved ONCE per process, before anything runs; nothing downstream changes it.

Precedence, later wins:
    1. the dataclass defaults (forge_core/config.py)
    2. the YAML recipe (--config)
    3. the command's options (--rank, --steps...; a preference command's --lr, --beta, --adapter set its section)
    4. --set section.key=value
    5. the method: a preference run trains at its section's rate (dpo.lr, ...) unless train.lr itself was given in
       2-4; a run that continues an SFT adapter takes the adapter's model, lora and quant sections (the adapter
       fits only the base and shape it was trained with: a different value given in 2-4 is refused, by key)
    6. --resume RUN: the run's saved config.json, all of it, except memory.* (how much this machine may use now)
What the run saves (RUN/config.json, the adapter's forge.json) is exactly what it ran with.
"""

from __future__ import annotations

import copy
import json

from forge_core.config import ForgeConfig
from forge_core.config_parse import build_config, from_dict
from forge_core.errors import ForgeError
from forge_core.methods import section
from forge_core.rundir import RunDir

MARK = "_forge_resolved"  # set on a resolved config (not a field: never saved): train() does not resolve it again


def resolve(kind: str, recipe: str | None = None, sets=(), overrides: dict | None = None,
            resume: str | None = None) -> ForgeConfig:
    """Steps 1-6 above, for `forge <kind>`."""
    explicit: set[str] = set()
    cfg = build_config(recipe, sets, overrides, explicit=explicit)
    if resume:
        cfg = for_resume(RunDir(resume), cfg)
    else:
        apply_method(cfg, kind, explicit)
    setattr(cfg, MARK, True)
    return cfg


def is_resolved(cfg: ForgeConfig) -> bool:
    return getattr(cfg, MARK, False)


def apply_method(cfg: ForgeConfig, kind: str, explicit: set[str]) -> None:
    """Step 5: the method's learning rate and the adapter a preference run continues."""
    sec = section(cfg, kind)
    if sec is None:
        return
    if "train.lr" not in explicit:
        cfg.train.lr = sec.lr
    if sec.adapter:
        inherit_adapter(cfg, kind, explicit)


def inherit_adapter(cfg: ForgeConfig, kind: str, explicit: set[str]) -> None:
    """A run on top of an SFT adapter: model, LoRA shape and quantization are the adapter's."""
    from forge_core.adapters.formats import forge_adapter_dir

    sec = section(cfg, kind)
    try:
        meta_file = forge_adapter_dir(sec.adapter) / "forge.json"
    except ForgeError as e:
        raise ForgeError(f"{kind}.adapter: {e}") from None
    saved = from_dict(json.loads(meta_file.read_text())["config"])
    for key in sorted(explicit):
        part, _, name = key.partition(".")
        if part in ("model", "lora", "quant") and getattr(getattr(cfg, part), name) != getattr(getattr(saved, part), name):
            raise ForgeError(f"{key}: {getattr(getattr(cfg, part), name)!r} given, but {kind}.adapter {meta_file.parent} "
                             f"was trained with {getattr(getattr(saved, part), name)!r}; drop it (the run takes the "
                             "adapter's model, lora and quant)")
    cfg.model, cfg.lora, cfg.quant = saved.model, saved.lora, saved.quant
    sec.adapter = str(meta_file.parent)


def for_resume(run: RunDir, cfg: ForgeConfig) -> ForgeConfig:
    """Step 6: the run's saved config, except memory.* - how much memory this machine may use now (the planner's
    device and threshold, the runtime limit) - which comes from `cfg`, this invocation's. So `--resume RUN --set
    memory.limit=8GB` raises a limit that stopped it."""
    saved = from_dict(run.load_config())
    saved.memory = copy.deepcopy(cfg.memory)
    setattr(saved, MARK, True)
    return saved
