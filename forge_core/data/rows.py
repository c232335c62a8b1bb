"""Reading training rows and checking their shape - no tokenizer here.

Sources (`iter_rows`): sources.py - JSONL, JSON, parquet and CSV files, directories of JSONL, `datasets`
directories, dataset repos and Hub dataset ids, with data.valid as a split or a held-out fraction.

Row formats (after `DataConfig.columns` renames: our name -> the dataset's column):
    SFT          {"messages": [{"role", "content"}, ...]} | {"prompt", "completion"} | {"text"}
    preference   {"prompt", "chosen", "rejected"}: each a string or a message list; chosen/rejected as a
                 list hold exactly one assistant message
    unpaired     {"prompt", "completion", "label"} (KTO; TRL's unpaired preference format): label true for a
                 desirable completion, false for an undesirable one
    any row may carry "system" (a string) - used when the conversation has no system message.

Problems are raised as `RowProblem(what)`; the caller adds `path:line:` and decides to stop or skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from forge_core.data.shapes import normalise
from forge_core.data.sources import RowProblem, source_rows
from forge_core.errors import ForgeError, located

ROLES = ("system", "user", "assistant", "tool")
FIELDS = ("messages", "prompt", "completion", "text", "chosen", "rejected", "label", "system", "tools",
          "conversations", "instruction", "input", "output", "history")  # the last: ShareGPT / Alpaca (shapes.py)
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


@dataclass
class SftExample:
    messages: list[dict] | None = None  # chat form; prompt/completion rows become [system?, user, assistant]
    tools: list[dict] | None = None  # the tools the conversation may call (passed to the chat template)
    text: str | None = None  # a plain-text row
    prompt: str | None = None  # prompt/completion kept as strings for tokenizers without a chat template
    completion: str | None = None

    def last_answer(self) -> tuple[list[dict], str]:
        """The conversation (chat form) up to its last assistant turn, and that turn's text: a held-out reference."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last], self.messages[last]["content"]


@dataclass
class PreferenceExample:
    prompt: list[dict] | str  # a message list (system included) or a plain string
    chosen: str
    rejected: str
    system: str = ""  # for a string prompt: the system message to put before it ("" = none)


@dataclass
class UnpairedExample:
    prompt: list[dict] | str
    completion: str
    label: bool  # True: desirable
    system: str = ""


# ---------------------------------------------------------------- sources


def iter_rows(path, data=None):
    """Yield (file, line, row) where row is a dict (columns applied) or a RowProblem for a bad line. `data`: the
    DataConfig (its columns, subset, split and held-out fraction: sources.py), or just a columns dict."""
    columns = check_columns(data if isinstance(data, dict) or data is None else data.columns)
    for file, line, row in source_rows(path, None if isinstance(data, dict) else data):
        if not isinstance(row, RowProblem):
            try:
                row = normalise(_rename(row, columns))
            except RowProblem as e:
                row = e
        yield file, line, row


def read_rows(path, data=None) -> list[tuple[str, int, dict]]:
    """All rows of a source as (file, line, row); the first bad line raises ForgeError(`file:line: ...`)."""
    out = []
    for file, line, row in iter_rows(path, data):
        if isinstance(row, RowProblem):
            raise ForgeError(located(file, line, str(row)))
        out.append((file, line, row))
    return out


def check_columns(columns: dict | None) -> dict:
    columns = dict(columns or {})
    for ours, theirs in columns.items():
        if ours not in FIELDS:
            raise ForgeError(f"data.columns: '{ours}' is not a field Forge reads (fields: {', '.join(FIELDS)})")
        if not isinstance(theirs, str) or not theirs:
            raise ForgeError(f"data.columns: '{ours}' must map to a column name, got {theirs!r}")
    return columns


def _rename(row: dict, columns: dict) -> dict:
    """Apply `our name -> their column`; a mapped column that is absent leaves our name absent too."""
    if not columns:
        return row
    out = {k: v for k, v in row.items() if k not in columns}  # an unmapped field of ours is not read
    for ours, theirs in columns.items():
        if theirs in row:
            out[ours] = row[theirs]
    return out


# ---------------------------------------------------------------- row checks


def json_type(value) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def check_text(value, where: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{where} must be a string, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RowProblem(f"{where} holds an unpaired surrogate (a broken \\ud8xx escape)") from None
    return value


def check_messages(value, where: str) -> list[dict]:
    """A message list -> clean [{"role", "content"}] (other keys dropped, so templates see only these), an assistant
    turn's tool_calls and a tool message's name kept (an assistant turn that only calls tools may have no text)."""
    if not isinstance(value, list):
        raise RowProblem(f"{where} must be a list of {{\"role\", \"content\"}} objects, got {json_type(value)}")
    if not value:
        raise RowProblem(f"{where} is empty")
    out = []
    for i, m in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            raise RowProblem(f"{at} must be an object with 'role' and 'content', got {json_type(m)}")
        if "role" not in m:
            raise RowProblem(f"{at} has no 'role'")
        role = check_text(m["role"], f"{at}.role")
        if role not in ROLES:
            raise RowProblem(f"{at}.role is {role[:40]!r}; allowed: {', '.join(ROLES)}")
        calls = m.get("tool_calls") if role == "assistant" else None
        if "content" not in m and not calls:
            raise RowProblem(f"{at} has no 'content'")
        content = m.get("content")
        msg = {"role": role, "content": "" if content is None and calls else check_text(content, f"{at}.content")}
        if calls:
            msg["tool_calls"] = check_tool_calls(calls, f"{at}.tool_calls")
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def check_tool_calls(value, where: str) -> list[dict]:
    """[{"type": "function", "function": {"name", "arguments"}}] (TRL's and the chat templates' form); arguments
    given as a JSON string are parsed, as the templates of Qwen2.5 and Llama 3.1 expect an object."""
    if not isinstance(value, list):
        raise RowProblem(f"{where} must be a list of tool calls, got {json_type(value)}")
    out = []
    for i, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowProblem(f"{where}[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                             "\"arguments\"}}}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RowProblem(f"{where}[{i}].function.arguments is not JSON") from None
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


def check_tools(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowProblem(f"{where} must be a list of tool (function) schemas, got {json_type(value)}")
    return value


class _Row:
    """A row plus the column mapping, so every message names the field the way the user wrote it."""

    def __init__(self, data: dict, columns: dict | None):
        self.data, self.columns = data, columns or {}

    def __contains__(self, field: str) -> bool:
        return field in self.data

    def name(self, field: str) -> str:
        theirs = self.columns.get(field)
        return f"'{theirs}' (data.columns {field})" if theirs and theirs != field else f"'{field}'"

    def raw(self, field: str):
        if field not in self.data:
            raise RowProblem(f"missing field {self.name(field)}")
        return self.data[field]

    def string(self, field: str) -> str:
        return check_text(self.raw(field), self.name(field))

    def messages(self, field: str) -> list[dict]:
        return check_messages(self.raw(field), self.name(field))

    def keys(self) -> str:
        keys = list(self.data)
        return ", ".join(repr(k)[:40] for k in keys[:8]) + (", ..." if len(keys) > 8 else "") or "none"

    def with_system(self, messages: list[dict], default: str) -> list[dict]:
        """Put the row's "system" (else the configured default) first unless a system message exists."""
        system = self.string("system") if "system" in self else default
        if system and messages[0]["role"] != "system":
            return [{"role": "system", "content": system}] + messages
        return messages


def parse_sft(row: dict, system: str = "", columns: dict | None = None) -> SftExample:
    """Check one SFT row and bring it to chat form (or text)."""
    r = _Row(row, columns)
    if "messages" in r:
        msgs = r.messages("messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowProblem(f"{r.name('messages')} has no assistant turn (nothing to learn from)")
        tools = check_tools(r.raw("tools"), r.name("tools")) if "tools" in r and r.raw("tools") else None
        return SftExample(messages=r.with_system(msgs, system), tools=tools)
    if "prompt" in r or "completion" in r:
        prompt, completion = r.string("prompt"), r.string("completion")
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return SftExample(messages=r.with_system(msgs, system), prompt=prompt, completion=completion)
    if "text" in r:
        return SftExample(text=r.string("text"))
    raise RowProblem("expected 'messages', 'prompt' + 'completion', or 'text' "
                     f"(found keys: {r.keys()}; map other names with data.columns)")


def _completion(r: _Row, field: str) -> str:
    value = r.raw(field)
    if isinstance(value, list):
        msgs = r.messages(field)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise RowProblem(f"{r.name(field)} as a list must hold exactly one assistant message")
        return msgs[0]["content"]
    return r.string(field)


def _prompt(r: _Row, system: str) -> tuple[list[dict] | str, str]:
    """(prompt as messages with the system message in, ""), or (prompt string, its system message)."""
    if isinstance(r.raw("prompt"), list):
        msgs = r.messages("prompt")
        if msgs[-1]["role"] == "assistant":
            raise RowProblem(f"{r.name('prompt')} ends with an assistant turn; it must end with the user turn")
        return r.with_system(msgs, system), ""
    return r.string("prompt"), r.string("system") if "system" in r else system


def parse_preference(row: dict, system: str = "", columns: dict | None = None) -> PreferenceExample:
    """Check one preference row: prompt (string or messages), chosen, rejected, optional system."""
    r = _Row(row, columns)
    if "prompt" not in r:
        raise RowProblem(f"missing field {r.name('prompt')} (preference rows need prompt, chosen, rejected; "
                         f"found keys: {r.keys()})")
    chosen, rejected = _completion(r, "chosen"), _completion(r, "rejected")
    prompt, own = _prompt(r, system)
    return PreferenceExample(prompt, chosen, rejected, system=own)


def parse_prompt(row: dict, system: str = "", columns: dict | None = None) -> tuple[list[dict], dict]:
    """A prompt-only row {prompt (string or messages), ...}: (the prompt as messages, its other columns), the
    columns row-aligned for reward functions (TRL's prompt-only format)."""
    r = _Row(row, columns)
    if "prompt" not in r:
        raise RowProblem(f"missing field {r.name('prompt')} (prompt rows need 'prompt', a string or messages; "
                         f"found keys: {r.keys()})")
    prompt, own = _prompt(r, system)
    if isinstance(prompt, str):
        prompt = ([{"role": "system", "content": own}] if own else []) + [{"role": "user", "content": prompt}]
    return prompt, {k: v for k, v in row.items() if k not in ("prompt", "system")}


def parse_unpaired(row: dict, system: str = "", columns: dict | None = None) -> list[UnpairedExample]:
    """Check one KTO row: {prompt, completion, label: true/false}, or a pair {prompt, chosen, rejected}, which
    becomes two rows (chosen desirable, rejected undesirable - TRL's unpair_preference_dataset)."""
    r = _Row(row, columns)
    if "label" not in r and ("chosen" in r or "rejected" in r):
        ex = parse_preference(row, system, columns)
        return [UnpairedExample(ex.prompt, ex.chosen, True, ex.system),
                UnpairedExample(ex.prompt, ex.rejected, False, ex.system)]
    if "prompt" not in r or "completion" not in r or "label" not in r:
        raise RowProblem(f"expected 'prompt', 'completion' and 'label' (true/false), or a pair 'prompt', 'chosen', "
                         f"'rejected' (found keys: {r.keys()}; map other names with data.columns)")
    label = r.raw("label")
    if not isinstance(label, bool):
        raise RowProblem(f"{r.name('label')} must be true or false (desirable or not), got {json_type(label)} "
                         f"{json.dumps(label)[:40]}")
    prompt, own = _prompt(r, system)
    return [UnpairedExample(prompt, _completion(r, "completion"), label, own)]
