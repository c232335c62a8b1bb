"""Held-out rows as (prompt messages, reference answer) pairs for generation-based metrics, and the system
prompt a run's rows share (recorded in forge.json so generate/eval ask the trained model as it was taught).

SFT rows: the conversation up to its LAST assistant turn is the prompt, that turn is the reference.
Preference rows: the prompt, with `chosen` as the reference. GRPO's prompt-only rows: the prompt, with the
`reference` column (if any) as the reference.
"""

from __future__ import annotations

from forge_core.config import DataConfig
from forge_core.data.rows import (
    RowProblem,
    iter_rows,
    parse_preference,
    parse_prompt,
    parse_sft,
    parse_unpaired,
)
from forge_core.errors import ForgeError, located


def _pair(row: dict, data_cfg: DataConfig):
    if "chosen" in row or data_cfg.columns.get("chosen") in row:
        ex = parse_preference(row, data_cfg.system_prompt, data_cfg.columns)
        if isinstance(ex.prompt, str):
            sys_msgs = [{"role": "system", "content": ex.system}] if ex.system else []
            return sys_msgs + [{"role": "user", "content": ex.prompt}], ex.chosen
        return ex.prompt, ex.chosen
    if _prompt_only(row, data_cfg):
        messages, columns = parse_prompt(row, data_cfg.system_prompt, data_cfg.columns)  # GRPO's prompt-only rows
        return messages, str(columns.get("reference", ""))
    ex = parse_sft(row, data_cfg.system_prompt, data_cfg.columns)
    if ex.messages is None:
        return None  # a plain-text row has no question to ask
    return ex.last_answer()


def _prompt_only(row: dict, data_cfg: DataConfig) -> bool:
    def has(k):
        return k in row or data_cfg.columns.get(k) in row

    return has("prompt") and not any(has(k) for k in ("completion", "messages", "text", "chosen", "label"))


def prompt_only(path, data_cfg: DataConfig) -> bool:
    """Whether the file's rows are GRPO's prompt-only rows (no answer to score a held-out loss on)."""
    for _, _, row in iter_rows(path, data_cfg):
        return not isinstance(row, RowProblem) and _prompt_only(row, data_cfg)
    return False


def prompts_and_references(path, data_cfg: DataConfig) -> list[tuple[list[dict], str]]:
    pairs = []
    for file, line, row in iter_rows(path, data_cfg):
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


def _prompt_system(row: dict, data_cfg: DataConfig) -> str | None:
    """The system message a row's prompt starts with ("" for none); None for a row without a prompt."""
    if "label" in row or data_cfg.columns.get("label") in row:  # KTO's unpaired rows
        ex = parse_unpaired(row, data_cfg.system_prompt, data_cfg.columns)[0]
        prompt = ex.prompt if not isinstance(ex.prompt, str) else [{"role": "system", "content": ex.system}]
    else:
        pair = _pair(row, data_cfg)
        if pair is None:
            return None
        prompt = pair[0]
    return prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""


def shared_system_prompt(path, data_cfg: DataConfig) -> str:
    """The system message every usable row of `path` starts its prompt with ("" when a row has none, or
    rows differ). Bad rows are left out here: training stopped at them or skipped them."""
    shared = None
    for _, _, row in iter_rows(path, data_cfg):
        try:
            system = None if isinstance(row, RowProblem) else _prompt_system(row, data_cfg)
        except RowProblem:
            continue
        if system is None:
            continue
        if not system or (shared is not None and system != shared):
            return ""
        shared = system
    return shared or ""
