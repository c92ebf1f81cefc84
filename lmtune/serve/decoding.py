"""Token ids to text, piece by piece, without losing or changing a character; and the ``stop`` strings.

Contract: ``IncrementalText.add`` takes one generated token and returns the text that became
certain with it. The text is always ``tokenizer.decode`` of every token so far (the same call
``lmtune chat`` makes on the whole answer), and each piece is what that decoding added, so the
pieces joined are the whole answer: spaces that SentencePiece/BPE tokens carry at their start,
newlines, and characters whose UTF-8 bytes span several tokens (the U+FFFD marks that end a
decoding are held back: they may be the first bytes of a character the next token completes). A ``stop`` string ends the answer
before it (OpenAI's rule: the stop string itself is not returned); text that could be the start
of a stop string is held back until the next tokens decide. The reference split its stream on
whitespace and lost newlines; decoding whole prefixes cannot.
"""

from __future__ import annotations

import contextlib
import threading

from transformers import PreTrainedTokenizerBase

# What decode() yields for bytes that do not yet form a whole UTF-8 character.
_INCOMPLETE = "\ufffd"


class IncrementalText:
    """The answer's text as tokens arrive, released in pieces that are final.

    Args:
        tokenizer: The model's tokenizer.
        stop: Strings that end the answer (not included in it).
        lock: Held while decoding, when other threads use the tokenizer too.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | tuple[str, ...] = (),
                 lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.lock = lock or contextlib.nullcontext()
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.released = ""
        self.stopped = False  # a stop string was found: the answer is complete

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """How many final characters could still grow into a stop string."""
        longest = 0
        for s in self.stop:
            for size in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[-size:]):
                    longest = size
                    break
        return longest

    def _release(self, text: str, end: int) -> str:
        if not text.startswith(self.released):
            # A tokenizer whose decoding of a longer sequence rewrites earlier characters (rare
            # clean-up rules): what was sent stays sent, and only what follows it is added.
            return ""
        piece = text[len(self.released):end]
        self.released += piece
        return piece

    def add(self, token: int) -> str:
        """Take one generated token; return the text that is now certain ('' while undecided)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._decode()
        # Trailing U+FFFD may be the first bytes of a character the next token completes: not final yet.
        final = text.rstrip(_INCOMPLETE)
        stop = self._stop_at(final)
        if stop is not None:
            self.stopped = True
            return self._release(final, stop)
        return self._release(final, len(final) - self._held_back(final))

    def finish(self) -> str:
        """The rest of the answer once generation ended (held-back text, an unfinished character)."""
        if self.stopped:
            return ""
        text = self._decode()
        stop = self._stop_at(text)
        if stop is not None:
            self.stopped = True
        return self._release(text, len(text) if stop is None else stop)
