"""Held-out rows as (prompt messages, reference answer) pairs for generation-based metrics.

SFT rows: the conversation up to its LAST assistant turn is the prompt, that turn is the reference.
Preference rows: the prompt, with `chosen` as the reference.
"""

from __future__ import annotations

from forge_core.config import DataConfig
from forge_core.data.rows import RowProblem, iter_rows, parse_preference, parse_sft
from forge_core.errors import ForgeError, located


def _pair(row: dict, data_cfg: DataConfig):
    if "chosen" in row or data_cfg.columns.get("chosen") in row:
        ex = parse_preference(row, data_cfg.system_prompt, data_cfg.columns)
        if isinstance(ex.prompt, str):
            sys_msgs = [{"role": "system", "content": ex.system}] if ex.system else []
            return sys_msgs + [{"role": "user", "content": ex.prompt}], ex.chosen
        return ex.prompt, ex.chosen
    ex = parse_sft(row, data_cfg.system_prompt, data_cfg.columns)
    if ex.messages is None:
        return None  # a plain-text row has no question to ask
    last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
    return ex.messages[:last], ex.messages[last]["content"]


def prompts_and_references(path, data_cfg: DataConfig) -> list[tuple[list[dict], str]]:
    pairs = []
    for file, line, row in iter_rows(path, data_cfg.columns):
        try:
            if isinstance(row, RowProblem):
                raise row
            pair = _pair(row, data_cfg)
        except RowProblem as e:
            if data_cfg.skip_bad_rows:
                continue
            raise ForgeError(located(file, line, str(e))) from None
        if pair is not None:
            pairs.append(pair)
    return pairs
