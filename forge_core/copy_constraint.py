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
            done += len(self.pieces[self.closing_step(done)])
            self.closing_length += 1

    def text(self, ids: list[int]) -> str:
        return "".join(self.pieces[t] or "" for t in ids if 0 <= t < len(self.pieces))

    def matching(self, source: str, at: int) -> set[int]:
        """Ids whose text is source[at:at + k] for some k >= 1."""
        out = set()
        for k in range(1, min(self.longest, len(source) - at) + 1):
            out.update(self.by_text.get(source[at:at + k], ()))
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
    must."""

    MAX_CHARS = 400

    def __init__(self, source: str, pieces: TokenPieces, long_enough, inside: bool = True, max_tokens: int = 0):
        self.source, self.pieces, self.long_enough, self.inside = source, pieces, long_enough, inside
        self.last_call = max_tokens - pieces.closing_length if max_tokens else None
        self._viable: dict[int, bool] = {}

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
        return quote in self.source and self.long_enough(quote.strip(), self.source)

    def _extending(self, quote: str) -> set[int]:
        """Ids that keep `quote` + their text a substring of the source, read from a start that can close."""
        out, at = set(), self.source.find(quote)
        while at >= 0:
            if self._can_close_from(at):
                out |= self.pieces.matching(self.source, at + len(quote))
            at = self.source.find(quote, at + 1)
        return out

    def _can_close_from(self, at: int) -> bool:
        """Whether a quote starting at `at` can grow long enough to close: its longest form (to the end of the source,
        or MAX_CHARS) can. Quotes only grow, so a quote from such a start is never a dead end; other starts are
        left out (a few whole-line quotes near the end of the source with them)."""
        if at not in self._viable:
            self._viable[at] = self._may_close(self.source[at:at + self.MAX_CHARS])
        return self._viable[at]
