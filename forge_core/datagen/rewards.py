"""Reward functions for GRPO (`forge grpo --reward FILE.py:fn --reward builtin:json_fields`), summed with weights.

A reward is TRL's shape: fn(prompts, completions, **columns) -> list of floats (None: this function cannot score
that completion), where `columns` holds each extra column of the data rows as a list, row-aligned. Users' own
functions come from a local Python file they name (imported as a module; nothing from a hub). Built-ins:
    builtin:valid_json          1 when the completion is one JSON object, else 0
    builtin:json_fields[:COL]   the share of the reference's fields (COL, default "reference": a JSON object or
                                its text) that the first JSON object in the completion gets right - forge eval's
                                field_acc (forge_core/eval/metrics.py); 0 when the completion holds no JSON object
    builtin:exact[:COL]         1 when the stripped completion equals the stripped reference
    builtin:regex:PATTERN       1 when the completion matches PATTERN (re.search), else 0
    builtin:length:N            −(characters beyond N) / N: 0 up to N characters, −1 at 2N
A reward that raises, returns the wrong number of values or a non-number stops the run with one line naming
the function and the data row.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge_core.errors import ForgeError
from forge_core.eval.metrics import json_fields_score


def _json_object(text: str):
    text = text.strip()
    if text.startswith("```"):  # a fenced answer: the JSON inside
        text = text.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def valid_json(prompts, completions, **columns) -> list[float]:
    return [float(_json_object(c) is not None) for c in completions]


def json_fields(column: str = "reference"):
    def json_fields(prompts, completions, **columns) -> list[float]:
        refs = _column(columns, column, "json_fields")
        out = []
        for c, ref in zip(completions, refs):
            want = ref if isinstance(ref, dict) else _json_object(str(ref))
            if not want:
                out.append(None)  # nothing to compare with: this row is not scored by this function
            else:  # forge eval's field_acc: the first JSON object in the completion, fields compared as JSON values
                out.append(json_fields_score(c, json.dumps(want))["field_acc"])
        return out
    return json_fields


def exact(column: str = "reference"):
    def exact(prompts, completions, **columns) -> list[float]:
        refs = _column(columns, column, "exact")
        return [float(c.strip() == str(r).strip()) for c, r in zip(completions, refs)]
    return exact


def regex(pattern: str):
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise ForgeError(f"--reward builtin:regex:{pattern}: not a valid regular expression ({e})") from None

    def regex(prompts, completions, **columns) -> list[float]:
        return [float(rx.search(c) is not None) for c in completions]
    return regex


def length(limit: str):
    n = int(limit) if limit.isdigit() else 0
    if n <= 0:
        raise ForgeError(f"--reward builtin:length:{limit}: give a positive number of characters")

    def length(prompts, completions, **columns) -> list[float]:
        return [-max(0, len(c) - n) / n for c in completions]
    return length


def _column(columns: dict, name: str, fn: str) -> list:
    if name not in columns:
        raise ForgeError(f"reward builtin:{fn} compares with the column '{name}', which the data rows do not have "
                         f"(columns: {', '.join(sorted(columns)) or 'none'}); name another with builtin:{fn}:COLUMN")
    return columns[name]


BUILTINS: dict[str, Callable] = {"valid_json": lambda: valid_json, "json_fields": json_fields, "exact": exact,
                                 "regex": regex, "length": length}


_IMPORTED: dict[Path, object] = {}  # reward files run once a process: the launch's check and GRPO share them


def _from_file(spec: str) -> Callable:
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ForgeError(f"--reward {spec}: write FILE.py:FUNCTION or builtin:NAME "
                         f"(built-ins: {', '.join(BUILTINS)})")
    file = Path(path)
    if not file.is_file():
        raise ForgeError(f"--reward {spec}: {path} is not a file (a reward is a function in a local .py file)")
    module = _IMPORTED.get(file.resolve())
    if module is None:
        name_in_sys = f"forge_reward_{file.stem}"
        module_spec = importlib.util.spec_from_file_location(name_in_sys, file)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name_in_sys] = module  # registered first, as an import would (dataclasses and pickling need it)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: say which and why, in one line
            del sys.modules[name_in_sys]
            raise ForgeError(f"--reward {spec}: importing {path} failed: {type(e).__name__}: {e}") from None
        _IMPORTED[file.resolve()] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ForgeError(f"--reward {spec}: {path} has no function '{name}'")
    return fn


def load(spec: str) -> Callable:
    """The reward function a --reward names: builtin:NAME[:ARG] or FILE.py:FUNCTION."""
    if spec.startswith("builtin:"):
        name, _, arg = spec[len("builtin:"):].partition(":")
        if name not in BUILTINS:
            raise ForgeError(f"--reward {spec}: no built-in '{name}' (built-ins: {', '.join(BUILTINS)})")
        if name in ("regex", "length") and not arg:
            raise ForgeError(f"--reward {spec}: builtin:{name} needs an argument (builtin:{name}:...)")
        return BUILTINS[name](arg) if arg else BUILTINS[name]()
    return _from_file(spec)


@dataclass
class Rewards:
    """Several reward functions and their weights: score() -> per-function values and the weighted sum."""

    specs: list[str]
    weights: list[float]
    fns: list[Callable]

    @classmethod
    def from_specs(cls, specs: list[str], weights: list[float] | None = None) -> Rewards:
        if not specs:
            raise ForgeError("GRPO needs at least one reward: --reward FILE.py:FUNCTION or --reward builtin:NAME")
        weights = list(weights) if weights else [1.0] * len(specs)
        if len(weights) != len(specs):
            raise ForgeError(f"grpo.reward_weights has {len(weights)} weights for {len(specs)} rewards")
        return cls(list(specs), [float(w) for w in weights], [load(s) for s in specs])

    def score(self, prompts: list, completions: list[str], columns: dict[str, list], where: list[str]) -> tuple:
        """(N, F) values per function (NaN where a function returned None) and the (N,) weighted sums (NaN
        where every function returned None: TRL's unscorable completion). `where` names each row (file:line)."""
        per_fn = np.full((len(completions), len(self.fns)), np.nan)
        for j, (spec, fn) in enumerate(zip(self.specs, self.fns)):
            per_fn[:, j] = self._call(spec, fn, prompts, completions, columns, where)
        scorable = ~np.isnan(per_fn).all(axis=1)
        total = np.where(scorable, np.nansum(per_fn * np.asarray(self.weights)[None, :], axis=1), np.nan)
        return per_fn, total

    @staticmethod
    def _call(spec, fn, prompts, completions, columns, where) -> np.ndarray:
        try:
            out = fn(prompts, completions, **columns)
        except ForgeError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's function: named, with its row, in one line
            row = _first_failing_row(fn, prompts, completions, columns)
            at = f" on {where[row]}" if row is not None else ""
            raise ForgeError(f"reward {spec} raised {type(e).__name__}: {e}{at}") from None
        if not isinstance(out, (list, tuple, np.ndarray)) or len(out) != len(completions):
            got = f"{len(out)} values" if hasattr(out, "__len__") else type(out).__name__
            raise ForgeError(f"reward {spec} returned {got} for {len(completions)} completions "
                             f"(rows {where[0]} .. {where[-1]}); return one float (or None) per completion")
        values = np.full(len(out), np.nan)
        for i, v in enumerate(out):
            if v is None:
                continue
            try:
                values[i] = float(v)
            except (TypeError, ValueError):
                raise ForgeError(f"reward {spec} returned {v!r} for {where[i]}; return a float or None") from None
            if not math.isfinite(values[i]):
                raise ForgeError(f"reward {spec} returned {v!r} for {where[i]}; return a finite float or None")
        return values


def _first_failing_row(fn, prompts, completions, columns) -> int | None:
    """The first row on which `fn` alone raises, to name it in the error (None when only the batch fails)."""
    for i in range(len(completions)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:  # noqa: BLE001 - any failure marks the row
            return i
    return None
