"""`forge data distill PROMPTS --teacher MODEL | --teacher-url URL`: a teacher's answers as training rows.

Prompts are TRL's prompt-only rows ({prompt: string or messages, ...other columns}). Each answer becomes a forge SFT
row {"messages": prompt + assistant}. With --samples N and rewards (forge_core/datagen/rewards.py, the same functions as
GRPO's), the best of the N answers is the SFT row (best-of-N, rejection sampling), and --pairs FILE also gets
{prompt, chosen: best, rejected: worst} for DPO whenever the best scored above the worst.

Teachers: any model forge loads (base, or base + adapter) through the backend's batched generator, or an
OpenAI-compatible chat endpoint the user names (a local llama.cpp / Ollama / vLLM server); the network is used
only for a URL given. Resumable: the rows already in the output are kept (a torn last line is cut off). A local
teacher is seeded per chunk of 16 prompts, so a resume asks the interrupted chunk again whole and writes the same
file as an uninterrupted run; a server is asked with OpenAI's `seed` field per prompt, so a resume asks it only
for the prompts not yet written.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from forge_core.atomic import write_text
from forge_core.config import DataConfig
from forge_core.data.rows import RowProblem, iter_rows, parse_prompt
from forge_core.errors import ForgeError, located


def read_prompts(path, data_cfg: DataConfig | None = None) -> list[tuple[list[dict], dict, str]]:
    """(prompt messages, extra columns, "file:line") of every prompt row; a bad row stops with its file:line."""
    data_cfg = data_cfg or DataConfig()
    out = []
    for file, line, row in iter_rows(path, data_cfg):
        try:
            if isinstance(row, RowProblem):
                raise row
            messages, columns = parse_prompt(row, data_cfg.system_prompt, data_cfg.columns)
        except RowProblem as e:
            raise ForgeError(located(file, line, str(e))) from None
        out.append((messages, columns, f"{file}:{line}"))
    if not out:
        raise ForgeError(f"{path}: no prompt rows")
    return out


class LocalTeacher:
    """A model forge loads, answering through the backend's batched generator."""

    def __init__(self, ops, model_spec: str | None, adapter: str | None, batch_size: int = 32):
        from forge_core.eval.evaluate import _for_inference, recorded_system_prompt

        self.ops, self.batch_size = ops, batch_size
        self.model, self.tokenizer, _ = _for_inference(ops, adapter, model_spec)
        self.system = recorded_system_prompt(adapter)  # asked as it was taught, where a prompt has no system
        self.pieces = None  # the tokenizer's token texts, for copy-constrained answers (built when first asked)

    def _taught(self, conversations: list[list[dict]]) -> list[list[dict]]:
        if not self.system:
            return conversations
        return [c if c[0]["role"] == "system" else [{"role": "system", "content": self.system}, *c]
                for c in conversations]

    def answer(self, conversations: list[list[dict]], n: int, temp: float, max_tokens: int, seed: int) -> list[list[str]]:
        from forge_core.eval import generation

        self.ops.seed(seed)
        flat = generation.answers(self.ops, self.model, self.tokenizer,
                                  [c for c in self._taught(conversations) for _ in range(n)], max_tokens, temp,
                                  self.batch_size)
        return [flat[i * n:(i + 1) * n] for i in range(len(conversations))]

    def answer_quoting(self, conversations: list[list[dict]], sources: list[str], max_tokens: int,
                       long_enough) -> list[str]:
        """One greedy answer per conversation that opens with a quote, and in which every quote is a verbatim piece
        of that conversation's source (copy-constrained decoding, forge_core/datagen/copy_constraint.py); a quote may
        close once long_enough(quote, source)."""
        from forge_core.datagen.copy_constraint import OPEN, QuoteConstraint, TokenPieces
        from forge_core.eval import generation

        if self.pieces is None:
            self.pieces = TokenPieces(self.ops.hf_tokenizer(self.tokenizer))
        return generation.answers(self.ops, self.model, self.tokenizer, self._taught(conversations), max_tokens, 0.0,
                                  self.batch_size, begin=OPEN,
                                  constraints=[QuoteConstraint(s, self.pieces, long_enough, max_tokens=max_tokens)
                                               for s in sources])


class URLTeacher:
    """An OpenAI-compatible /v1/chat/completions endpoint (OPENAI_API_KEY is sent when set). Each prompt is asked
    with its own seed (seed + its position in the list), so any subset can be asked again alike."""

    per_prompt = True

    def __init__(self, url: str, model: str = "", timeout: float = 600):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model, self.timeout = model, timeout

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            raise ForgeError(f"teacher {self.url}: HTTP {e.code} {e.reason}: {e.read()[:200].decode(errors='replace')}"
                             ) from None
        except (urllib.error.URLError, OSError) as e:
            raise ForgeError(f"teacher {self.url}: cannot reach it ({getattr(e, 'reason', e)}); is the server up?"
                             ) from None
        except json.JSONDecodeError:
            raise ForgeError(f"teacher {self.url}: the answer is not JSON; is it an OpenAI-compatible endpoint?"
                             ) from None

    def answer(self, conversations: list[list[dict]], n: int, temp: float, max_tokens: int, seed: int) -> list[list[str]]:
        out = []
        for i, messages in enumerate(conversations):
            body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temp,
                    "n": n, "seed": seed + i}
            answers = self._contents(self._post(body))
            while len(answers) < n:  # a server that ignores `n`: asked again, one answer at a time
                more = self._contents(self._post({**body, "n": 1, "seed": seed + i + 7919 * len(answers)}))
                if not more:
                    raise ForgeError(f"teacher {self.url}: an answer without choices")
                answers.append(more[0])
            out.append(answers[:n])
        return out

    def _contents(self, reply: dict) -> list[str]:
        try:
            return [c["message"]["content"] or "" for c in reply["choices"]]
        except (KeyError, TypeError, IndexError):
            raise ForgeError(f"teacher {self.url}: no choices[].message.content in its answer") from None


def done_rows(path: Path) -> int:
    """Complete rows already in `path` (a torn last line, from a kill, is cut off)."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data[: data.rfind(b"\n") + 1]
    if len(keep) != len(data):
        os.truncate(path, len(keep))  # in place: a kill now leaves the same file, or the shorter one
    return keep.count(b"\n")


def keep_rows_of(path: Path, done: set[str]) -> None:
    """Keep the rows of `path` whose "source" is in `done` (a kill can leave a chunk's pairs without their SFT rows)."""
    if not path.exists():
        return
    done_rows(path)
    lines = path.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if row_source(ln, path) in done]
    if len(kept) != len(lines):
        write_text(path, "".join(kept))


def row_source(line: str, path: Path) -> str:
    """The "source" of a row forge wrote; a file with other rows is not one to resume."""
    try:
        return json.loads(line)["source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ForgeError(f"{path}: holds rows forge did not write (no \"source\"); give another output file") from None


def distill(prompts, out, teacher, samples: int = 1, rewards=None, pairs: str | None = None, max_tokens: int = 256,
            temp: float = 0.7, seed: int = 0, chunk: int = 16, console=None) -> dict:
    """Write SFT rows (and DPO pairs) to `out` from the teacher's answers; returns counts."""
    rows = read_prompts(prompts)
    if samples < 1:
        raise ForgeError(f"--samples {samples}: at least 1")
    if pairs and samples < 2:
        raise ForgeError("--pairs needs --samples 2 or more (chosen / rejected are the best / worst of them)")
    if samples > 1 and rewards is None:
        raise ForgeError("--samples N > 1 picks the best answer by reward: give --reward FILE.py:fn or builtin:NAME")
    if pairs and rewards is None:
        raise ForgeError("--pairs needs --reward (chosen / rejected are the best / worst answer by reward)")
    out, pairs_path = Path(out), Path(pairs) if pairs else None
    out.parent.mkdir(parents=True, exist_ok=True)
    if pairs_path:
        pairs_path.parent.mkdir(parents=True, exist_ok=True)
    start = done_rows(out)
    if start:  # the rows there must be this run's: the same prompts, in order
        last = row_source(out.read_text().splitlines()[start - 1], out)
        if start > len(rows) or last != rows[start - 1][2]:
            raise ForgeError(f"{out}: its row {start} answers {last}, not {rows[min(start, len(rows)) - 1][2]}; "
                             "resume with the same prompts, or give another --out")
    if pairs_path is not None:
        keep_rows_of(pairs_path, {where for _, _, where in rows[:start]})
    counts = {"prompts": len(rows), "kept": start, "pairs": 0, "asked": 0}
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar, out.open("a") as sft_f, \
            (pairs_path.open("a") if pairs_path else open(os.devnull, "w")) as pair_f:
        task = bar.add_task("distilling", total=len(rows), completed=start)
        # chunks start at multiples of `chunk` from the first prompt, whatever a resume starts at: a local
        # teacher's sampling seed is per chunk, so a resumed file is the file an uninterrupted run writes
        for s in range(start - start % chunk if start < len(rows) else start, len(rows), chunk):
            # a server is seeded per prompt (URLTeacher.per_prompt): only the prompts not written are asked, with
            # the seeds an uninterrupted run gives them; a local teacher is seeded per chunk: the whole chunk
            first = max(s, start) if getattr(teacher, "per_prompt", False) else s
            part = rows[first:s + chunk]
            answers = teacher.answer([m for m, _, _ in part], samples, temp, max_tokens, seed * 1_000_003 + first)
            counts["asked"] += len(part)
            sft_lines, pair_lines = [], []
            for i, ((messages, columns, where), got) in enumerate(zip(part, answers), start=first):
                if i < start:  # written before the kill: its answers were asked again only for the seed
                    continue
                best = worst = 0
                if rewards is not None:
                    cols = {k: [v] * len(got) for k, v in columns.items()}
                    _, total = rewards.score([messages] * len(got), got, cols, [where] * len(got))
                    scored = np.where(np.isnan(total), -np.inf, total)
                    best, worst = int(np.argmax(scored)), int(np.argmin(scored))
                    if pairs_path and scored[best] > scored[worst]:
                        pair_lines.append(json.dumps({"prompt": messages, "chosen": got[best],
                                                      "rejected": got[worst], "source": where}))
                sft_lines.append(json.dumps({"messages": messages + [{"role": "assistant", "content": got[best]}],
                                             "source": where}))
            # a chunk's pairs first, then its SFT rows (what a resume counts): after a kill between the two,
            # the resume drops the chunk's pairs (by their "source") and asks again
            pair_f.write("".join(line + "\n" for line in pair_lines))
            pair_f.flush()
            sft_f.write("".join(line + "\n" for line in sft_lines))
            sft_f.flush()
            counts["kept"] += len(sft_lines)
            counts["pairs"] += len(pair_lines)
            bar.update(task, completed=s + len(part))
    return counts
