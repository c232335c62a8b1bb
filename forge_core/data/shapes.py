"""Row shapes other tools made common, recognised by their fields and turned into forge's own, the way
LLaMA-Factory's converters do (its AlpacaDatasetConverter and SharegptDatasetConverter; docs/FORMATS.md "Data rows"):

    ShareGPT  {"conversations": [{"from": ..., "value": ...}, ...], "system"?, "tools"?}
              a first "system" turn is the system prompt (else the row's "system"); then turns alternate
              human | observation, gpt | function_call, and end with gpt / function_call.
              human -> user, gpt -> assistant, function_call -> an assistant turn calling the tool(s) its value
              names ({"name", "arguments"} or a list of them, as JSON), observation -> a tool message.
    Alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}
              history turns first, then user = instruction + "\\n" + input (either alone when the other is
              empty), assistant = output.

Any other row passes through as it is (forge's messages, prompt/completion, text, preference, unpaired). Each row
comes back as a ShapedRow: a dict that knows which shape it was read as (the data summary counts them).
"""

from __future__ import annotations

import json

from forge_core.data.sources import RowProblem

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "assistant",
                  "system": "system"}
_ASKS, _ANSWERS = ("human", "observation"), ("gpt", "function_call")


NAMES = {"sharegpt": "ShareGPT", "alpaca": "Alpaca"}  # how the data summary names a shape (else by its key)


class ShapedRow(dict):
    """A row in forge's fields, with `shape`: the shape it was written in."""

    shape = "other"


def shape_of(row: dict) -> str:
    """messages | preference | unpaired | prompt/completion | prompt | text (forge's own) | sharegpt | alpaca |
    other (the parsers then say what is missing)."""
    for shape, present in (("messages", "messages" in row), ("preference", "chosen" in row or "rejected" in row),
                           ("unpaired", "label" in row), ("prompt/completion", "prompt" in row and "completion" in row),
                           ("prompt", "prompt" in row), ("text", "text" in row),
                           ("sharegpt", isinstance(row.get("conversations"), list)),
                           ("alpaca", "instruction" in row and "output" in row)):
        if present:
            return shape
    return "other"


def normalise(row: dict) -> ShapedRow:
    """The row in forge's fields (ShareGPT and Alpaca converted), tagged with the shape it was read as."""
    shape = shape_of(row)
    out = ShapedRow(_sharegpt(row) if shape == "sharegpt" else _alpaca(row) if shape == "alpaca" else row)
    out.shape = shape
    return out


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise RowProblem(f"{what} must be a string, got {type(value).__name__}")
    return value


def _sharegpt(row: dict) -> dict:
    turns = list(row["conversations"])
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise RowProblem(f"conversations[{i}] must be an object with 'from' and 'value' (ShareGPT)")
    system = row.get("system") or ""
    if turns and turns[0]["from"] == "system":
        system, turns = turns[0]["value"], turns[1:]
    messages = [{"role": "system", "content": _text(system, "system")}] if system else []
    for i, t in enumerate(turns):
        expected = _ASKS if i % 2 == 0 else _ANSWERS
        if t["from"] not in expected:
            raise RowProblem(f"conversations: turn {i + 1} is '{t['from']}' where ShareGPT alternates "
                             f"{'/'.join(_ASKS)} and {'/'.join(_ANSWERS)}")
        if t["from"] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(t["value"], i)})
        else:
            messages.append({"role": SHAREGPT_ROLES[t["from"]], "content": _text(t["value"], f"turn {i + 1}")})
    if len(turns) % 2:
        raise RowProblem("conversations must end with a gpt or function_call turn (ShareGPT: asked, then answered)")
    out = {"messages": messages}
    if row.get("tools"):
        out["tools"] = _tools(row["tools"])
    return out


def _tool_calls(value, i: int) -> list[dict]:
    """A function_call turn's value: {"name", "arguments"} or a list of them, as JSON (LLaMA-Factory's)."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise RowProblem(f"turn {i + 1}: a function_call value must be JSON ({e.msg})") from None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) for c in calls):
        raise RowProblem(f"turn {i + 1}: a function call is an object with 'name' and 'arguments'")
    # in TRL's form; rows.check_tool_calls checks the names and parses arguments given as JSON text
    return [{"type": "function", "function": {"name": c.get("name"), "arguments": c.get("arguments", {})}}
            for c in calls]


def _tools(value):
    """The row's tools, parsed when given as a JSON string (how ShareGPT files store them; rows.check_tools checks
    the list)."""
    try:
        return json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError as e:
        raise RowProblem(f"tools must be a JSON list of function schemas ({e.msg})") from None


def _alpaca(row: dict) -> dict:
    messages = []
    system = row.get("system") or ""
    if system:
        messages.append({"role": "system", "content": _text(system, "system")})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowProblem("history must be a list of [query, answer] pairs (Alpaca)")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise RowProblem(f"history[{i}] must be a [query, answer] pair (Alpaca)")
        messages += [{"role": "user", "content": _text(pair[0], f"history[{i}][0]")},
                     {"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")}]
    query = [_text(row[k], k) for k in ("instruction", "input") if row.get(k)]
    messages += [{"role": "user", "content": "\n".join(query)},
                 {"role": "assistant", "content": _text(row["output"], "output")}]
    return {"messages": messages}
