"""`forge data raft SRC_DIR --out raft.jsonl`: RAFT training rows from a codebase (Zhang et al. 2024, "RAFT: Adapting
Language Model to Domain Specific RAG").

1. Chunks: Python files by top-level function and class (the `ast` module; a class longer than MAX_LINES by method,
   anything still longer by lines), every other text file by windows of LINES lines overlapping by OVERLAP.
2. For each chunk and question kind (explain, usage, debugging) the teacher writes a question, then an answer that
   quotes the chunk between ##begin_quote## and ##end_quote## (asked after one worked example). A local teacher
   decodes under a copy constraint (forge_core/datagen/copy_constraint.py): its answer opens with a quote, and inside any
   quote it can only write a verbatim piece of the chunk. A URL teacher writes freely (a code block that occurs
   verbatim in the chunk counts as a quote and is marked as one). Either way an answer is kept only when it
   quotes, and every quote occurs verbatim in the chunk and is long enough; the others are dropped and counted
   (OUT.dropped.jsonl says why).
3. Each kept row shows the model `distractors` other chunks and, with probability `p_oracle`, the chunk itself,
   shuffled (RAFT's mix, which teaches it to answer from the right document and to ignore the rest).
Output: forge SFT rows {"messages": [system, user: documents + question, assistant: answer]} (trainable as is),
and with `layout` also RAFT's fields {instruction, context, distractor_context, oracle_context, output}.
Resumable (a chunk-kind already kept or dropped is not asked again) and deterministic with --seed: the
documents of a row depend on the seed and the chunk only, and a local teacher is seeded per batch of chunks.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from forge_core.datagen.copy_constraint import CLOSE, OPEN
from forge_core.datagen.distill import done_rows, keep_rows_of, row_source
from forge_core.errors import ForgeError

MAX_LINES, LINES, OVERLAP = 80, 40, 10
TEXT_SUFFIXES = {".py", ".md", ".rst", ".txt", ".toml", ".yaml", ".yml", ".json", ".cfg", ".ini", ".sh", ".js",
                 ".ts", ".c", ".h", ".cpp", ".rs", ".go", ".java", "Makefile"}
KINDS = {"explain": "a question asking what this code does and why",
         "usage": "a question asking how to use this code (which arguments, what it returns)",
         "debugging": "a question a developer would ask when this code fails or behaves unexpectedly"}
QUOTE = re.compile(f"{re.escape(OPEN)}(.*?){re.escape(CLOSE)}", re.DOTALL)
SYSTEM = ("Answer the question from the documents. Quote the lines you rely on between ##begin_quote## and "
          "##end_quote##, then give the answer.")


@dataclass(frozen=True)
class Chunk:
    path: str  # relative to the source dir
    start: int  # first line (1-based)
    end: int  # last line
    text: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.start}-{self.end}"


def _line_windows(path: str, lines: list[str], first: int = 1) -> list[Chunk]:
    out, step = [], LINES - OVERLAP
    for s in range(0, max(len(lines) - OVERLAP, 1), step):
        part = lines[s:s + LINES]
        if "".join(part).strip():
            out.append(Chunk(path, first + s, first + s + len(part) - 1, "".join(part)))
    return out


def _lines(text: str) -> list[str]:
    """The lines of `text` with their ends, split at "\n" only: ast's line numbers count "\n" alone (splitlines
    also splits at \f, \u2028 ...)."""
    parts = text.split("\n")
    return [ln + "\n" for ln in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _python_chunks(path: str, source: str) -> list[Chunk]:
    lines = _lines(source)
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return _line_windows(path, lines)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        span = lines[start - 1:node.end_lineno]
        if len(span) <= MAX_LINES:
            out.append(Chunk(path, start, node.end_lineno, "".join(span)))
            continue
        parts = [n for n in getattr(node, "body", []) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for n in parts or [node]:
            s = min([n.lineno] + [d.lineno for d in n.decorator_list])
            piece = lines[s - 1:n.end_lineno]
            out += ([Chunk(path, s, n.end_lineno, "".join(piece))] if len(piece) <= MAX_LINES
                    else _line_windows(path, piece, s))
    return out


def chunk_source(root) -> list[Chunk]:
    """Every chunk of the text files under `root` (hidden dirs, caches and files over 1 MB left out), in path order."""
    root = Path(root)
    if not root.is_dir():
        raise ForgeError(f"{root}: not a directory (forge data raft reads a source tree)")
    chunks = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or any(p.startswith(".") or p == "__pycache__" for p in rel.parts):
            continue
        if f.suffix not in TEXT_SUFFIXES and f.name not in TEXT_SUFFIXES or f.stat().st_size > 1_000_000:
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        chunks += _python_chunks(str(rel), text) if f.suffix == ".py" else _line_windows(str(rel), _lines(text))
    if not chunks:
        raise ForgeError(f"{root}: no text files to make chunks of")
    return chunks


MIN_QUOTE, MIN_LINE = 16, 6  # non-space characters: ")" or "self" occur in almost any chunk


def _long_enough(q: str, oracle: str) -> bool:
    """A quote of at least MIN_QUOTE non-space characters, or a whole line of the chunk of at least MIN_LINE."""
    n = len("".join(q.split()))
    return n >= MIN_QUOTE or (n >= MIN_LINE and q in {ln.strip() for ln in oracle.split("\n")})


def quotes_ok(answer: str, oracle: str) -> bool:
    """The answer quotes at least once, leaves no quote open, and every quote occurs verbatim (ends trimmed) in the
    oracle chunk and is long enough to say something (_long_enough)."""
    quotes = [q.strip() for q in QUOTE.findall(answer)]
    return (bool(quotes) and not _left_open(answer)
            and all(q in oracle and _long_enough(q, oracle) for q in quotes))


def _left_open(answer: str) -> bool:
    return answer.rfind(OPEN) > answer.rfind(CLOSE)


def drop_reason(question: str, answer: str, oracle: str) -> str | None:
    """Why a row is left out (None: it is kept)."""
    if not question:
        return "no question"
    if quotes_ok(answer, oracle):
        return None
    if _left_open(answer):
        return "a quote left open (raise --max-tokens)"
    if not QUOTE.search(answer):
        return "no quote"
    return "a quote not in the chunk, or too short"


def dropped_path(out: Path) -> Path:
    """Where the answers left out go, with the reason: OUT.dropped.jsonl beside OUT."""
    return out.with_name(out.stem + ".dropped.jsonl")


def question_prompt(chunk: Chunk, kind: str) -> list[dict]:
    return [{"role": "user", "content": f"Here is code from {chunk.path}:\n\n{chunk.text}\n\nWrite {KINDS[kind]}. "
                                        "Reply with the question only."}]


EXAMPLE = [{"role": "user", "content": "Document (calc.py):\ndef inc(x):\n    return x + 1\n\nQuestion: What does inc "
                                     "return?\n\nCopy the relevant line(s) from the document exactly, as "
                                     "##begin_quote##<line>##end_quote##, then answer."},
           {"role": "assistant", "content": "##begin_quote##return x + 1##end_quote## inc returns its argument plus one."}]
FENCE = re.compile(r"```[\w+-]*\n(.*?)\n?```", re.DOTALL)


def answer_prompt(chunk: Chunk, question: str) -> list[dict]:
    """The answer request, after one worked example of the quoting format (small teachers follow an example
    better than an instruction)."""
    return [{"role": "system", "content": SYSTEM}, *EXAMPLE,
            {"role": "user", "content": f"Document ({chunk.path}):\n{chunk.text}\n\nQuestion: {question}\n\n"
                                        "Copy the relevant line(s) from the document exactly, as "
                                        "##begin_quote##<line>##end_quote##, then answer."}]


def with_quote_marks(answer: str, oracle: str) -> str:
    """An answer without quote marks whose code blocks occur verbatim in the oracle, with those blocks marked as
    quotes (a teacher that quotes in markdown); any other answer as it is."""
    if QUOTE.search(answer):
        return answer
    return FENCE.sub(lambda m: f"##begin_quote##{m.group(1)}##end_quote##" if m.group(1).strip() and
                     m.group(1).strip() in oracle else m.group(0), answer)


def documents(chunks: list[Chunk], i: int, seed: int, p_oracle: float, distractors: int) -> tuple[list[Chunk], bool]:
    """The documents row `i` shows: k distractors (other chunks) and, with probability p_oracle, chunk i; shuffled.
    A function of (seed, i) alone, so a resume or another teacher gives the same documents."""
    rng = random.Random(seed * 1_000_003 + i)
    me = chunks[i]
    # never a window of the same file that shares lines with the oracle: a "distractor" must not hold the answer
    others = [j for j, c in enumerate(chunks) if j != i and not (c.path == me.path and c.start <= me.end
                                                                  and me.start <= c.end)]
    picked = [chunks[j] for j in rng.sample(others, min(distractors, len(others)))]
    with_oracle = rng.random() < p_oracle
    docs = picked + ([chunks[i]] if with_oracle else [])
    rng.shuffle(docs)
    return docs, with_oracle


def row(chunk_docs: list[Chunk], question: str, answer: str) -> dict:
    context = "\n\n".join(f"<document path=\"{d.path}\" lines=\"{d.start}-{d.end}\">\n{d.text}</document>"
                          for d in chunk_docs)
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": f"{context}\n\nQuestion: {question}"},
                         {"role": "assistant", "content": answer}]}


def _done(paths: list[Path]) -> set[str]:
    """The sources (chunk and kind) already kept or dropped, from the output files (torn last lines cut off)."""
    seen = set()
    for p in paths:
        if p.exists():
            done_rows(p)
            seen |= {row_source(ln, p) for ln in p.read_text().splitlines()}
    return seen


def raft(src, out, teacher, kinds: list[str] | None = None, p_oracle: float = 0.8, distractors: int = 3,
         seed: int = 0, max_tokens: int = 256, layout: str | None = None, limit: int = 0, batch: int = 16,
         copy_quotes: bool = True, console=None) -> dict:
    """Write RAFT rows for the chunks of `src` to `out` (and RAFT's field layout to `layout`); returns counts.
    `copy_quotes`: a local teacher's answers open with a quote and can only quote their chunk verbatim
    (copy-constrained decoding); a URL teacher, or copy_quotes=False, writes freely and is checked after."""
    kinds = kinds or list(KINDS)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ForgeError(f"--kind {bad[0]}: choose from {', '.join(KINDS)}")
    if not 0 <= p_oracle <= 1:
        raise ForgeError("--p-oracle is a probability: 0 to 1")
    if distractors < 0:
        raise ForgeError(f"--distractors {distractors}: 0 or more")
    chunks = chunk_source(src)
    order = chunks[:limit] if limit else chunks
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dropped = dropped_path(out)
    layout_path = Path(layout) if layout else None
    done = _done([out, dropped])
    if layout_path is not None:
        keep_rows_of(layout_path, done)
    jobs = [(i, k) for i in range(len(order)) for k in kinds]
    counts = {"chunks": len(order), "kept": 0, "dropped": 0, "asked": 0}
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar, out.open("a") as out_f, dropped.open("a") as drop_f, \
            (layout_path.open("a") if layout_path else open(os.devnull, "w")) as layout_f:
        task = bar.add_task("raft", total=len(jobs))
        for s in range(0, len(jobs), batch):
            part = jobs[s:s + batch]
            todo = [(i, k) for i, k in part if f"{order[i].where}#{k}" not in done]
            bar.update(task, completed=s + len(part) - len(todo))
            if not todo:
                continue
            # the teacher is asked for the whole batch (its seed is per batch), then what was done is left out
            questions = [a[0].strip() for a in teacher.answer([question_prompt(order[i], k) for i, k in part], 1, 0.7,
                                                              max_tokens, seed * 1_000_003 + s)]
            asks = [answer_prompt(order[i], q) for (i, _), q in zip(part, questions)]
            if copy_quotes and hasattr(teacher, "answer_quoting"):
                answers = teacher.answer_quoting(asks, [order[i].text for i, _ in part], max_tokens, _long_enough)
            else:
                answers = [with_quote_marks(a[0], order[i].text) for (i, _), a in zip(part, teacher.answer(
                    asks, 1, 0.0, max_tokens, seed * 1_000_003 + s + 1))]
            counts["asked"] += len(todo)
            kept, lost, fields = [], [], []
            for (i, k), q, a in zip(part, questions, answers):
                source = f"{order[i].where}#{k}"
                if source in done:
                    continue
                why = drop_reason(q, a, order[i].text)
                if why:
                    lost.append({"source": source, "why": why, "question": q, "answer": a})
                    continue
                docs, with_oracle = documents(chunks, i, seed, p_oracle, distractors)
                kept.append({**row(docs, q, a), "source": source})
                fields.append({"instruction": q, "context": [d.text for d in docs], "oracle_context": order[i].text,
                               "distractor_context": [d.text for d in docs if d != order[i]],
                               "oracle_included": with_oracle, "output": a, "source": source})
            # the layout first, the rows a resume counts last: a kill in between leaves nothing counted twice
            for f, recs in ((layout_f, fields), (drop_f, lost), (out_f, kept)):
                f.write("".join(json.dumps(r) + "\n" for r in recs))
                f.flush()
            counts["kept"] += len(kept)
            counts["dropped"] += len(lost)
            bar.update(task, completed=s + len(part))
    return counts
