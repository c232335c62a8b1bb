"""The README as a reader runs it: its shell commands and Python snippets in order (tests/test_readme.py).

`steps(text)` cuts README.md into what a reader would type: each line of a ```bash block (backslash-continued
lines joined, comment lines dropped) and each ```python block whole. TABLE says, for the commands that cannot run
here as they stand, what the test does instead: skip with the reason (a network, a second machine, installing
packages), or run with a named change. Nothing else is skipped or changed, and every entry must match a command
(a stale entry fails the test too). The files the README leaves to the reader (their model, data, reward file,
source tree) are made by tests/test_readme.py place().
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass
class Step:
    line: int  # README line number where it starts
    lang: str  # bash | python
    code: str


def steps(text: str) -> list[Step]:
    out, lang, start, buf = [], None, 0, []
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence and lang is None:
            lang, start, buf = fence.group(1) or "text", n + 1, []
            continue
        if fence and lang is not None:
            if lang == "python":
                out.append(Step(start, "python", "\n".join(buf) + "\n"))
            elif lang == "bash":
                out += _commands(buf, start)
            lang = None
            continue
        if lang is not None:
            buf.append(line)
    return out


def _commands(lines: list[str], first: int) -> list[Step]:
    out, pending, at = [], "", first
    for k, line in enumerate(lines):
        if not pending:
            at = first + k
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append(Step(at, "bash", (pending + line).strip()))
        pending = ""
    return out


@dataclass
class Entry:
    pattern: str  # a regular expression searched in the command
    skip: str = ""  # why it does not run here ("" = it runs)
    replace: tuple = ()  # (old, new) pairs applied to the command before it runs
    background: bool = False  # a server: started, waited for (its /health answers), stopped when the walk ends


# What a reader fills in or cannot run here. Placeholders are made by the test (tests/test_readme.py: place()).
TABLE = [
    Entry(r"^pip install", skip="installs packages from the network (the test runs in the installed venv)"),
    Entry(r"^make test\b", skip="is this test suite"),
    Entry(r"--teacher-url http", skip="asks a teacher server over HTTP"),
    Entry(r"--hosts 10\.0\.0|--nnodes 2", skip="needs a second machine"),
    # runs with the reader's own model as the teacher: the bundled model's stand-in ends every answer at once
    # (tests/tiny.py make_stand_in), so it would write no questions
    Entry(r"^forge data raft \./my_project", replace=(("--out raft.jsonl", "--out raft.jsonl --teacher ./my-hf-model"),)),
    # runs, in the installed venv: make is told its stamp is up to date, so it never installs anything
    Entry(r"^make demo\b", replace=(("make demo", "make -o .venv/.stamp demo"),)),
    # runs until stopped: the walk starts it, waits for its /health, runs the commands after it against it
    Entry(r"^forge serve ", background=True),
]
