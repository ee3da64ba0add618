"""Turning a growing list of token ids into text deltas, holding back what a stop string may still claim."""

from __future__ import annotations


class Detokenizer:
    """Incremental text of one request: :meth:`push` a token, get the text that is safe to send."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add ``token``; return the new text that can be sent (empty while a stop string or a split character may be forming)."""
        self.ids.append(token)
        text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self._stop) if i >= 0), default=-1)
        if hit >= 0:
            self.stopped = True
            return self._take(text, hit)
        safe = len(text) - self._held(text)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            safe = min(safe, len(text) - 1)
        return self._take(text, safe)

    def flush(self) -> str:
        """Everything not yet sent (at the end of a request that did not stop on a stop string)."""
        if self.stopped:
            return ""
        return self._take(self._tokenizer.decode(self.ids, skip_special_tokens=True), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        out = text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self, text: str) -> int:
        # Length of the longest tail of ``text`` that begins some stop string.
        return max((k for s in self._stop for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])), default=0)
