"""Copy-constrained decoding: between an opening and a closing marker (RAFT's ##begin_quote## ... ##end_quote##)
a local model can only write a verbatim piece of a given source text; outside the markers it writes freely.

A weak teacher asked to quote its document paraphrases, invents or runs on (SmolLM2-135M kept 0 of 8 RAFT answers
without this). The constraint turns "quote the document" from a request into a property of the decoding: at each
step inside a quote the only tokens left are those that extend the quote to a longer substring of the source, and,
once the quote is long enough to say something, those that start or finish the closing marker. The model still
chooses where the quote starts and how long it is (its own likelihoods over the allowed tokens), so the quote is
the teacher's choice, not ours; greedy decoding stays greedy.

Framework-free: a backend asks `allowed(generated_ids)` for each constrained row at each step and masks the other
logits (forge_mlx and forge_cuda generate.py). Token texts come from the tokenizer once (TokenPieces), decoded
after an anchor token so SentencePiece's leading-space pieces keep their space.
"""

from __future__ import annotations

from functools import cache

from forge_core.errors import ForgeError

OPEN, CLOSE = "##begin_quote##", "##end_quote##"


class TokenPieces:
    """The text each token id adds to a decoded string (None: a special token or a partial UTF-8 character, never
    allowed inside a quote), and the ids by text."""

    def __init__(self, hf):
        anchor = hf.encode("a", add_special_tokens=False)[-1]
        head = hf.decode([anchor])
        special = set(getattr(hf, "all_special_ids", []) or [])
        size = len(hf)
        texts = hf.batch_decode([[anchor, t] for t in range(size)], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
        self.pieces: list[str | None] = [
            None if t in special or not s.startswith(head) or "\ufffd" in s or len(s) == len(head) else s[len(head):]
            for t, s in enumerate(texts)]
        self.by_text: dict[str, list[int]] = {}
        for t, s in enumerate(self.pieces):
            if s is not None:
                self.by_text.setdefault(s, []).append(t)
        self.longest = max(map(len, self.by_text), default=1)
        done, self.closing_length = 0, 0  # tokens the closing marker takes, written with closing_step
        while done < len(CLOSE):
            step = self.closing_step(done)
            if step < 0:
                raise ForgeError(f"this tokenizer cannot write {CLOSE!r} token by token: use --free-quotes")
            done += len(self.pieces[step])
            self.closing_length += 1

    def text(self, ids: list[int]) -> str:
        return "".join(self.pieces[t] or "" for t in ids if 0 <= t < len(self.pieces))

    def matching(self, source: str, at: int) -> list[tuple[int, int]]:
        """(id, k) of the tokens whose text is source[at:at + k], k >= 1."""
        out = []
        for k in range(1, min(self.longest, len(source) - at) + 1):
            out += [(t, k) for t in self.by_text.get(source[at:at + k], ())]
        return out

    @cache  # noqa: B019 - one TokenPieces per tokenizer, kept for the run
    def closing(self, done: int) -> frozenset[int]:
        """Ids that go on with the closing marker after its first `done` characters (finishing it, and maybe text
        after it)."""
        rest = CLOSE[done:]
        return frozenset(t for s, ids in self.by_text.items() if rest.startswith(s) or s.startswith(rest) for t in ids)

    @cache  # noqa: B019
    def closing_step(self, done: int) -> int:
        """The id of the longest text that goes on with the closing marker after `done` characters."""
        rest = CLOSE[done:]
        return max(((len(s), ids[0]) for s, ids in self.by_text.items() if rest.startswith(s)), default=(0, -1))[1]


class QuoteConstraint:
    """Decoding in which every quote is a verbatim piece of `source`. `inside`: the prompt already ends with the
    opening marker (the answer starts with a quote). `long_enough(quote, source)` says when the quote may close;
    at MAX_CHARS of quote, or when only the closing marker still fits in `max_tokens`, a quote that may close
    must. A quote only takes steps after which it can still grow long enough (it never runs into a dead end but
    for the token budget), and never copies a marker out of the source."""

    MAX_CHARS = 400

    def __init__(self, source: str, pieces: TokenPieces, long_enough, inside: bool = True, max_tokens: int = 0):
        self.source, self.pieces, self.long_enough, self.inside = source, pieces, long_enough, inside
        self.last_call = max_tokens - pieces.closing_length if max_tokens else None
        self._steps: list[list[tuple[int, int]]] = []  # per position of the source: (id, length) of the tokens there
        self._far: list[int] = []  # per position: the furthest end a quote going on from there can reach
        self._viable: dict[tuple[int, int], bool] = {}

    def quote_so_far(self, generated: list[int]) -> str | None:
        """The open quote's text, or None outside a quote."""
        text = (OPEN if self.inside else "") + self.pieces.text(generated)
        at = text.rfind(OPEN)
        if at < 0 or CLOSE in text[at + len(OPEN):]:
            return None
        return text[at + len(OPEN):]

    def allowed(self, generated: list[int]) -> list[int] | None:
        """The ids the next token may take (None: any)."""
        quote = self.quote_so_far(generated)
        if quote is None:
            return None
        # the last tokens of the budget: the closing marker, in as few tokens as it takes
        late = self.last_call is not None and len(generated) >= self.last_call
        closing = (lambda done: {self.pieces.closing_step(done)}) if late else self.pieces.closing
        out = set()
        # the quote may end with the start of the closing marker: every way of reading it that way is open
        for done in range(len(CLOSE) - 1, 0, -1):
            if quote.endswith(CLOSE[:done]) and self._may_close(quote[:-done]):
                out |= closing(done)
        if quote in self.source:
            if not ((late or len(quote) >= self.MAX_CHARS) and self._may_close(quote)):
                out |= self._extending(quote)
            if self._may_close(quote):
                out |= closing(0)
        # nothing left (a quote cut short by the token budget) closes anyway: the answer is dropped when checked
        return sorted(out) if out else sorted(self.pieces.closing(0))

    def _may_close(self, quote: str) -> bool:
        """A quote of the source, long enough, that the closing marker closes cleanly: its markers are the only
        ones in OPEN + quote + CLOSE (not a quote ending in "##end_quote#" or "##begin_quote#", which the closing
        marker's first "#" would complete)."""
        whole = OPEN + quote + CLOSE
        return (quote in self.source and self.long_enough(quote.strip(), self.source)
                and whole.find(CLOSE) == len(whole) - len(CLOSE) and whole.find(OPEN, 1) < 0)

    def _extending(self, quote: str) -> set[int]:
        """Ids that keep `quote` + their text a substring of the source, from a start where it can still grow long
        enough, without writing a marker."""
        self._tables()
        out, tail = set(), (OPEN + quote)[1 - len(OPEN):]  # with the opening marker: "##" + "end_quote##" closes
        for start in _find_all(self.source, quote):
            end = start + len(quote)
            for t, k in self._steps[end] if end < len(self.source) else ():
                text = tail + self.pieces.pieces[t]
                if self._can_grow(start, end + k) and OPEN not in text and CLOSE not in text:
                    out.add(t)
        return out

    def _tables(self) -> None:
        """Per position: the tokens whose text starts there, and the furthest end a quote can reach going on from
        there (right to left; a character that only byte tokens write - no token starts there - ends the way)."""
        if self._far:
            return
        n = len(self.source)
        self._steps = [self.pieces.matching(self.source, at) for at in range(n)]
        self._far = list(range(n + 1))
        for at in range(n - 1, -1, -1):
            self._far[at] = max([at] + [self._far[at + k] for _, k in self._steps[at]])

    def _can_grow(self, start: int, end: int) -> bool:
        """Whether a quote source[start:end] can still grow long enough: the furthest it can reach (at most
        MAX_CHARS, and short of a marker that the opening marker and the source's text would write) can."""
        key = (start, end)
        if key not in self._viable:
            text = OPEN + self.source[start:start + self.MAX_CHARS]
            marks = [at + len(k) - 1 - len(OPEN) for k in (OPEN, CLOSE) for at in [text.find(k, 1)] if at >= 0]
            stop = min([self._far[end], start + self.MAX_CHARS] + [start + max(0, m) for m in marks])
            # or a little shorter (a "#" at its end would mix with the closing marker), but not shorter than now
            self._viable[key] = any(self._may_close(self.source[start:e])
                                    for e in range(stop, max(end, stop - len(OPEN)) - 1, -1))
        return self._viable[key]


def _find_all(text: str, part: str) -> list[int]:
    out, at = [], text.find(part)
    while at >= 0:
        out.append(at)
        at = text.find(part, at + 1)
    return out
