"""Copy-constrained decoding (forge_core/datagen/copy_constraint.py): inside ##begin_quote## ... ##end_quote## a model can
only write a verbatim piece of its source, and closes the quote only once it is long enough (and must, when the
token budget is nearly spent). Checked on random walks through the allowed tokens, and on both backends' batched
generation from a random tiny model - the worst quoter there is - through the local teacher and `forge data raft`."""

import json
import random

import pytest
from click.testing import CliRunner

from forge_core.cli import cli
from forge_core.datagen import raft as fr
from forge_core.datagen.copy_constraint import CLOSE, OPEN, QuoteConstraint, TokenPieces
from tests.test_preference_methods import BACKENDS

SOURCE = "def add(a, b):\n    return a + b\n\n\ndef twice(x):\n    # double it: twice is x + x\n    return 2 * x\n"


@pytest.fixture(scope="module")
def pieces(tiny_model):
    from transformers import AutoTokenizer

    return TokenPieces(AutoTokenizer.from_pretrained(str(tiny_model)))


def _texts(pieces, ids):
    return {pieces.pieces[t] for t in ids}


def test_pieces_are_the_text_each_token_adds(pieces, tiny_model):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_model))
    assert pieces.text(hf.encode("    return a + b", add_special_tokens=False)) == "    return a + b"
    assert all(pieces.pieces[t] is None for t in hf.all_special_ids)
    assert pieces.closing_length == len(CLOSE)  # one byte a token


def test_inside_a_quote_only_the_source_and_once_long_enough_the_closing_marker(pieces):
    c = QuoteConstraint(SOURCE, pieces, fr._long_enough)
    # any start a long enough quote can grow from (not "x\n" at the end); too short to close
    starts = {SOURCE[p] for p in range(len(SOURCE)) if fr._long_enough(SOURCE[p:].strip(), SOURCE)}
    assert _texts(pieces, c.allowed([])) == starts and "*" not in starts
    ids = [pieces.by_text[ch][0] for ch in "return a +"]
    assert _texts(pieces, c.allowed(ids)) == {" "}  # one way on, not long enough to close
    ids += [pieces.by_text[ch][0] for ch in " b"]  # a whole line of the source: it may close now
    assert _texts(pieces, c.allowed(ids)) == {"\n", "#"}
    ids += [pieces.by_text[ch][0] for ch in "##end"]
    assert _texts(pieces, c.allowed(ids)) == {"_"}  # the marker, and nothing else, goes on
    ids += [pieces.by_text[ch][0] for ch in "_quote##"]
    assert c.allowed(ids) is None  # closed: free text
    ids += [pieces.by_text[ch][0] for ch in " see " + OPEN]
    assert _texts(pieces, c.allowed(ids)) == starts  # a second quote is held to the source too


def _walk(c, pieces, rng, steps, prefer_quoting=False):
    """Random tokens among the allowed ones (free text: letters, spaces and now and then the opening marker)."""
    ids = []
    free = [pieces.by_text[ch][0] for ch in "ab #\n"]
    while len(ids) < steps:
        allowed = c.allowed(ids)
        if allowed is None:
            ids += [pieces.by_text[ch][0] for ch in OPEN] if rng.random() < 0.1 else [rng.choice(free)]
            continue
        if prefer_quoting:  # never close by choice: only the constraint can end the quote
            on = [t for t in allowed if t not in pieces.closing(0)] or allowed
            allowed = on
        ids.append(rng.choice(allowed))
    return ids[:steps]


MARKED = 'QUOTE = re.compile(r"##begin_quote##(.*?)##end_quote##")\nSHORT = "##end_quote##"\n'  # raft.py has these
UNICODE = "if a ≥ b:\n    return a  # ≥ is three bytes: no token of this tokenizer writes it whole\n"


@pytest.mark.parametrize("source", [SOURCE, MARKED, UNICODE], ids=["code", "markers", "unicode"])
def test_random_walks_quote_only_the_source_and_never_run_into_a_dead_end(pieces, source):
    for seed in range(40):
        rng = random.Random(seed)
        c = QuoteConstraint(source, pieces, fr._long_enough, inside=seed % 2 == 0)
        text = (OPEN if c.inside else "") + pieces.text(_walk(c, pieces, rng, 160))
        quotes = fr.QUOTE.findall(text)
        # every quote verbatim and long enough: no start that cannot grow long enough (" b:" before a "≥" no token
        # writes), no marker copied out of the source
        assert all(q.strip() in source and fr._long_enough(q.strip(), source) for q in quotes), (seed, text)
        if c.inside:
            assert quotes, text  # the first quote closed


def test_a_quote_closes_before_the_token_budget_runs_out(pieces):
    for seed in range(10):  # 47 characters of this source are always long enough: by token 47 the quote closes
        c = QuoteConstraint(SOURCE, pieces, fr._long_enough, max_tokens=60)
        text = OPEN + pieces.text(_walk(c, pieces, random.Random(seed), 60, prefer_quoting=True))
        assert fr.quotes_ok(text, SOURCE), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_random_model_quotes_verbatim_and_unconstrained_rows_are_unchanged(backend, tiny_model):
    from forge_core.backend import ops as backend_ops
    from forge_core.datagen.distill import LocalTeacher
    from forge_core.eval import generation

    teacher = LocalTeacher(backend_ops(backend), str(tiny_model), None, batch_size=4)
    asks = [[{"role": "user", "content": f"Quote the code, number {i}."}] for i in range(3)]
    sources = [SOURCE, "x = 1  # one\ny = x + 1  # two\n", SOURCE[::-1]]
    answers = teacher.answer_quoting(asks, sources, 48, fr._long_enough)
    for a, s in zip(answers, sources):
        assert a.startswith(OPEN) and fr.quotes_ok(a, s), a  # every quote closed, verbatim, long enough
    # in a batch, a row without a constraint decodes as it does alone
    hf = teacher.ops.hf_tokenizer(teacher.tokenizer)
    prompts = [generation.chat_prompt(hf, m) for m in asks[:2]]
    mixed = generation.generate(teacher.ops, teacher.model, teacher.tokenizer, prompts, 24,
                                constraints=[QuoteConstraint(SOURCE, teacher.pieces, fr._long_enough, inside=False),
                                             None])
    plain = generation.generate(teacher.ops, teacher.model, teacher.tokenizer, prompts, 24)
    assert mixed[1] == plain[1]


def test_forge_data_raft_with_a_local_teacher_keeps_rows_forge_trains_on(tiny_model, tmp_path):
    pytest.importorskip("mlx.core")
    src = tmp_path / "src"
    src.mkdir()
    (src / "mod.py").write_text(SOURCE)
    out = tmp_path / "raft.jsonl"
    res = CliRunner().invoke(cli, ["data", "raft", str(src), "--teacher", str(tiny_model), "--backend", "mlx",
                                   "--kind", "explain", "--kind", "usage", "--max-tokens", "40", "--distractors",
                                   "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    dropped = [json.loads(ln) for ln in (tmp_path / "raft.dropped.jsonl").read_text().splitlines()]
    assert rows and all(d["why"] == "no question" for d in dropped)  # a random model's answers all quote
    chunks = {c.where: c.text for c in fr.chunk_source(src)}
    assert all(fr.quotes_ok(r["messages"][2]["content"], chunks[r["source"].split("#")[0]]) for r in rows)
    free = tmp_path / "free.jsonl"  # the same teacher writing freely: random bytes, no quotes
    res = CliRunner().invoke(cli, ["data", "raft", str(src), "--teacher", str(tiny_model), "--backend", "mlx",
                                   "--kind", "explain", "--max-tokens", "40", "--free-quotes", "--out", str(free)])
    assert res.exit_code == 0 and "0 rows kept" in res.output, res.output
    res = CliRunner().invoke(cli, ["train", "--backend", "mlx", "--model", str(tiny_model), "--data", str(out),
                                   "--steps", "1", "--batch-size", "1", "--rank", "4", "--max-seq-len", "2048",
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
