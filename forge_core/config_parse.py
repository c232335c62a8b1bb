"""Reading a config from text: YAML recipes, --set items, saved config dicts, onto forge_core/config.py's dataclasses.

Unknown keys and wrong types are errors that name the key; a number outside its Range (declared beside its default)
too. YAML's `1e-4` (a string to PyYAML) is accepted where a float is expected - the parser, not the user, is wrong
there. build_config: defaults <- recipe <- CLI overrides <- --set (forge_core/run_config.py resolves a run's config
from it, once).
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

from forge_core.config import SECTIONS, ForgeConfig, lora_init_kind
from forge_core.errors import ForgeError


def choices(key: str) -> tuple:
    """The allowed values of `section.key` (or `backend`), from its Literal type; () when any value goes."""
    section, _, name = key.partition(".")
    typ = _field_types(ForgeConfig)[section] if not name else _field_types(SECTIONS[section])[name]
    if typing.get_origin(typ) is Annotated:
        typ = typing.get_args(typ)[0]
    return typing.get_args(typ) if typing.get_origin(typ) is Literal else ()


def _coerce(key: str, value, typ):
    """Check/convert one value against a dataclass field type; the error names the key."""
    origin = typing.get_origin(typ)
    if origin is Annotated:  # a number with its allowed range
        typ, rng = typing.get_args(typ)
        value = _coerce(key, value, typ)
        if not rng.holds(value):
            raise ForgeError(f"config key '{key}': {value!r} is out of range (allowed: {rng})")
        return value
    if origin is list:
        item = typing.get_args(typ)[0]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if item is str and (not isinstance(value, list) or not all(isinstance(v, str) for v in value)):
            raise ForgeError(f"config key '{key}': expected a list of strings, got {value!r}")
        if not isinstance(value, list):
            raise ForgeError(f"config key '{key}': expected a list of numbers, got {value!r}")
        return [_coerce(key, v, item) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ForgeError(f"config key '{key}': expected a mapping, got {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ForgeError(f"config key '{key}': expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ForgeError(f"config key '{key}': expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ForgeError(f"config key '{key}': expected an integer, got {value!r}") from None
    if typ is float:
        if isinstance(value, bool):
            raise ForgeError(f"config key '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ForgeError(f"config key '{key}': expected a number, got {value!r}") from None
    if origin is Literal:
        allowed = typing.get_args(typ)
        value = _coerce(key, value, type(allowed[0]))
        if value not in allowed:
            raise ForgeError(f"config key '{key}': {value!r} is not one of {sorted(allowed, key=str)}")
        return value
    if typ is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ForgeError(f"config key '{key}': expected a string, got {value!r}")
        return str(value)
    raise AssertionError(f"unhandled config type {typ} for {key}")  # a bug in this file, not user input


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_choice(key: str, value) -> None:
    if key == "lora.init":  # a pattern (pissa_niter_N), not a fixed set
        lora_init_kind(value)


def set_value(cfg: ForgeConfig, key: str, value) -> str:
    """Set `section.key` (or the top-level `backend`) with type checking; returns the full key it set."""
    if key == "backend":
        cfg.backend = _coerce(key, value, _field_types(ForgeConfig)["backend"])
        return key
    section, _, name = key.partition(".")
    if not name:
        matches = [s for s, cls in SECTIONS.items() if section in _field_types(cls)]
        if len(matches) != 1:
            where = f"it is in {', '.join(matches)}" if matches else "no section has it"
            raise ForgeError(f"config key '{key}': write it as section.key ({where})")
        section, name = matches[0], section
        key = f"{section}.{name}"
    if section not in SECTIONS:
        raise ForgeError(f"unknown config section '{section}' in '{key}' (sections: {', '.join(SECTIONS)})")
    sub = getattr(cfg, section)
    types = _field_types(type(sub))
    if name not in types:
        raise ForgeError(f"unknown config key '{key}' (keys of {section}: {', '.join(types)})")
    coerced = _coerce(key, value, types[name])
    _check_choice(key, coerced)
    setattr(sub, name, coerced)
    return key


def apply_mapping(cfg: ForgeConfig, mapping: dict, source: str = "config", explicit: set | None = None) -> None:
    """Apply a nested mapping (a YAML recipe or a saved config dict); `explicit` collects the keys it set."""
    explicit = set() if explicit is None else explicit
    if not isinstance(mapping, dict):
        raise ForgeError(f"{source}: expected a mapping of sections at the top level")
    for section, values in mapping.items():
        if section == "backend":
            explicit.add(set_value(cfg, "backend", values))
            continue
        if section not in SECTIONS:
            raise ForgeError(f"{source}: unknown config section '{section}' (sections: backend, {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ForgeError(f"{source}: section '{section}' must be a mapping of keys")
        for name, value in values.items():
            try:
                explicit.add(set_value(cfg, f"{section}.{name}", value))
            except ForgeError as e:
                raise ForgeError(f"{source}: {e}") from None


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ForgeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else "?"
        raise ForgeError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return data or {}


SLICE = re.compile(r"-?\d*:-?\d*")  # a python slice as text (lora.layers)


def parse_set(item: str) -> tuple[str, object]:
    """'train.lr=1e-4' -> ('train.lr', 1e-4). The value is read as YAML (so lists and bools work)."""
    import yaml

    if "=" not in item:
        raise ForgeError(f"--set '{item}': expected section.key=value")
    key, _, raw = item.partition("=")
    if SLICE.fullmatch(raw.strip()):  # lora.layers=-8: / 0:12: YAML reads a mapping / a base-60 number
        return key.strip(), raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def build_config(recipe: str | None = None, sets: typing.Iterable[str] = (), overrides: dict | None = None,
                 explicit: set | None = None) -> ForgeConfig:
    """Defaults <- recipe YAML <- explicit CLI overrides {key: value} <- --set items. `explicit` collects every
    key the recipe, the options or --set gave (forge_core/run_config.py: what the method may not override)."""
    cfg = ForgeConfig()
    explicit = set() if explicit is None else explicit
    if recipe:
        apply_mapping(cfg, load_yaml(recipe), source=str(recipe), explicit=explicit)
    for key, value in (overrides or {}).items():
        if value is not None:
            explicit.add(set_value(cfg, key, value))
    for item in sets:
        key, value = parse_set(item)
        explicit.add(set_value(cfg, key, value))
    return cfg


def from_dict(mapping: dict) -> ForgeConfig:
    cfg = ForgeConfig()
    apply_mapping(cfg, mapping, source="saved config")
    return cfg
