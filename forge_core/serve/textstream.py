"""Token ids -> the text a client sees, piece by piece: never half a character (a piece ending in U+FFFD waits for
the next token), special tokens left out as `forge generate` leaves them out, and a request's stop strings cut the
text where the first one begins (a tail that may still become a stop string is held back until it cannot)."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is seen)
        self.shown = 0  # characters already handed out
        self.stopped = False  # a stop string was met

    def add(self, token: int) -> str:
        """The new text that is safe to show after `token`."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hold = 0
        for s in self.stop:
            at = text.find(s, max(0, self.shown - len(s) + 1))
            if at >= 0:
                self.text, self.stopped = text[:at], True
                return self._take(len(self.text))
            hold = max(hold, self._partial(text, s))
        return self._take(len(text) - hold)

    def finish(self) -> str:
        """What was held back, at the end of the answer."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        piece = self.text[self.shown:upto] if upto > self.shown else ""
        self.shown = max(self.shown, upto)
        return piece

    @staticmethod
    def _partial(text: str, stop: str) -> int:
        """Length of the longest tail of `text` that is a beginning of `stop`."""
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-n:]):
                return n
        return 0
