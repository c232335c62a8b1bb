"""forge serve's framework-free pieces: the text a client sees (stop strings, half characters), router.yaml (keyword,
classifier, hybrid; each mistake one line), the classifier's fit, the scheduler's row cap and cancellations."""

import asyncio
import time
import zlib

import numpy as np
import pytest

from forge_core.errors import ForgeError
from forge_core.serve.router import Classifier, load_router
from forge_core.serve.scheduler import Request, Scheduler
from forge_core.serve.textstream import TextStream


class CharTokenizer:
    """One token per byte; bytes that do not decode alone show as U+FFFD, as a byte-level BPE tokenizer's do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _stream(text: str, stop=None):
    s = TextStream(CharTokenizer(), stop)
    pieces = [s.add(b) for b in text.encode()]
    return pieces, s


def test_text_pieces_never_split_a_character_and_add_up_to_the_answer():
    pieces, s = _stream("café ü!")
    assert "".join(pieces) + s.finish() == "café ü!"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[3] == "" and pieces[4] == "é"  # é is two bytes: nothing after the first


def test_a_stop_string_cuts_the_answer_where_it_begins_and_is_held_back_until_decided():
    pieces, s = _stream("one two STOP three", stop=["STOP"])
    assert s.stopped and "".join(pieces) == "one two "
    assert pieces[len("one two S") - 1] == ""  # "S" may begin STOP: held back
    pieces, s = _stream("a SToP b", stop=["STOP"])  # never matched: everything comes out in the end
    assert not s.stopped and "".join(pieces) + s.finish() == "a SToP b"


ROUTER = """
mode: {mode}
default: general
threshold: 0.6
experts:
  code:
    keywords: [python, function]
    patterns: ['\\bdef \\w+\\(']
    examples: ["c1", "c2", "c3"]
  math:
    keywords: [integral, derivative]
    examples: ["m1", "m2", "m3"]
  general:
    examples: ["g1", "g2", "g3"]
"""

# toy features: each expert's examples around its own direction
CENTRES = {"code": np.array([1.0, 0, 0, 0]), "math": np.array([0, 1.0, 0, 0]), "general": np.array([0, 0, 1.0, 0])}


def _features(text: str) -> np.ndarray:
    kind = {"c": "code", "m": "math", "g": "general"}.get(text[0], "general")
    rng = np.random.default_rng(zlib.crc32(text.encode()))
    return CENTRES[kind] * 3 + rng.normal(0, 0.1, 4)


def _router(tmp_path, mode: str, fit: bool = True):
    path = tmp_path / "router.yaml"
    path.write_text(ROUTER.format(mode=mode))
    if fit:
        r = load_router(path, need_classifier=False)
        texts = [t for e in r.experts.values() for t in e.examples]
        labels = [n for n, e in r.experts.items() for _ in e.examples]
        Classifier.fit(np.stack([_features(t) for t in texts]), labels, list(r.experts)).save(
            r.classifier_path, {"base": "toy"})
    return load_router(path)


def test_keyword_routes_by_hits_and_falls_back_to_the_default(tmp_path):
    r = _router(tmp_path, "keyword", fit=False)
    route = r.route("Write a Python function: def add(a, b): ...")
    assert (route.expert, route.how, route.confidence) == ("code", "keyword", 1.0)
    assert r.route("the derivative of x^2, and a python one-liner").expert in ("code", "math")
    assert r.route("pythonic functional style").how == "default"  # whole words only
    assert (r.route("hello there").expert, r.route("hello there").how) == ("general", "default")


def test_classifier_routes_held_out_points_and_defers_below_the_threshold(tmp_path):
    r = _router(tmp_path, "classifier")
    held_out = [(f"c-held-{i}", "code") for i in range(5)] + [(f"m-held-{i}", "math") for i in range(5)]
    got = [r.route(t, _features).expert for t, _ in held_out]
    assert got == [want for _, want in held_out]
    ambiguous = lambda t: (CENTRES["code"] + CENTRES["math"]) * 1.5  # halfway between two experts
    route = r.route("anything", ambiguous)
    assert route.how == "default" and route.expert == "general" and route.confidence < 0.6


def test_hybrid_asks_keywords_first_then_the_classifier(tmp_path):
    r = _router(tmp_path, "hybrid")
    assert r.route("c-no keywords here", _features).how == "classifier"
    assert r.route("m-but it says python", _features).expert == "code"  # the keyword wins


@pytest.mark.parametrize("text,match", [
    ("experts: {}", "needs 'experts:'"),
    ("mode: vote\nexperts: {a: {}}", "mode 'vote' is not one of keyword, classifier, hybrid"),
    ("threshold: 2\nexperts: {a: {}}", "threshold must be a number in \\[0, 1\\]"),
    ("experts: {a: {keyword: [x]}}", "experts.a: unknown key 'keyword'"),
    ("experts: {a: {patterns: ['(']}}", "experts.a.patterns: '\\(' is not a regular expression"),
    ("experts: {a: {keywords: x}}", "experts.a.keywords: expected a list of strings"),
    ("mode: hybrid\nexperts: {a: {}}", "needs the classifier; run `forge router train"),
    ("experts: [", "not valid YAML"),
])
def test_router_mistakes_are_one_line_naming_the_file_and_key(tmp_path, text, match):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ForgeError, match=match) as e:
        load_router(tmp_path / "r.yaml")
    assert "r.yaml" in str(e.value) and "\n" not in str(e.value)


def test_a_router_naming_an_expert_that_is_not_served_is_refused(tmp_path):
    r = _router(tmp_path, "keyword", fit=False)
    with pytest.raises(ForgeError, match="expert 'math' is not served"):
        r.check_served(["code", "general"], "toy")


def test_a_classifier_fitted_on_another_base_is_refused(tmp_path):
    r = _router(tmp_path, "hybrid")
    r.check_served(["code", "math", "general"], "toy")
    with pytest.raises(ForgeError, match="fitted on the hidden states of toy, this server's base is other; run `forge "
                                         "router train .*router.yaml --model other`"):
        r.check_served(["code", "math", "general"], "other")


class FakeEngine:
    """Each row answers tokens 1, 2, ... up to its max_tokens; records the rows decoded at once."""

    def __init__(self):
        self.rows, self.widest, self.removed = {}, 0, []

    def lane(self, name):
        return name

    def insert(self, name, prompt, max_tokens, temp, top_p):
        uid = len(self.rows)
        self.rows[uid] = [name, 0, max_tokens]
        return uid

    def step(self, name):
        live = [u for u, r in self.rows.items() if r[0] == name and r[1] < r[2]]
        self.widest = max(self.widest, sum(1 for r in self.rows.values() if r[1] < r[2]))
        out = []
        for u in live:
            self.rows[u][1] += 1
            out.append((u, self.rows[u][1], "length" if self.rows[u][1] == self.rows[u][2] else None))
        return out

    def remove(self, name, uids):
        self.removed += uids
        for u in uids:
            self.rows[u][2] = self.rows[u][1]

    def pooled(self, ids):
        return np.zeros(2)


def test_the_scheduler_caps_rows_answers_everyone_and_frees_a_cancelled_row():
    engine = FakeEngine()
    sched = Scheduler(engine, max_rows=3, log=lambda m: None)
    sched.start()

    async def main():
        loop = asyncio.get_running_loop()
        reqs = [Request("a" if i % 2 else "b", [1], 5, loop=loop) for i in range(8)]
        for r in reqs:
            sched.submit(r)
        got = []
        for r in reqs:
            tokens = []
            while True:
                tok, finish = await r.events.get()
                tokens.append(tok)
                if finish:
                    break
            got.append(tokens)
        hang = Request("a", [1], 10_000, loop=loop)
        sched.submit(hang)
        await hang.events.get()
        sched.cancel(hang)
        return got, hang

    got, hang = asyncio.run(main())
    deadline = time.time() + 10
    while sched.rows() and time.time() < deadline:  # the cancellation is taken between steps
        time.sleep(0.01)
    sched.stop()
    assert got == [[1, 2, 3, 4, 5]] * 8
    assert engine.widest <= 3 and hang.uid in engine.removed and sched.rows() == 0
