"""Incremental detokenization with stop strings, for streaming text deltas.

Contract: ``IncrementalDetokenizer(tokenizer, skip_special_tokens, stop)``; after each new token call
``update(token_ids)`` with all generated ids so far; it returns the stop string when one appeared. ``text`` is
the text so far (cut before a stop string, as vLLM does: the stop string is not part of the output, its tokens
are). ``take_delta(final)`` returns the text not yet handed out; while running it holds back the last
``len(longest stop) - 1`` characters (they might start a stop string that must not be streamed) and any text
ending in an incomplete UTF-8 character. Each update decodes a window of a few tokens (the previous token for
context, so word-start spaces come out right), not the whole answer, so the cost per token stays constant.
The concatenated deltas equal ``tokenizer.decode(token_ids)`` cut at the stop string.
"""

from __future__ import annotations

from typing import Any, Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, stop: Sequence[str] | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        if self.stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer: give the engine a processor or a tokenizer")
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.prefix_offset = 0
        self.read_offset = 0
        self.stopped = False

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def update(self, token_ids: Sequence[int], final: bool = False, check_stop: bool = True) -> str | None:
        """Fold in the latest token(s); return the stop string that ended the text, if one did.

        ``final``: the sequence ends here, so a trailing U+FFFD is taken as it is; ``check_stop=False`` (before
        ``min_tokens``) extends the text without looking for stop strings."""
        if self.tokenizer is None or self.stopped or self.read_offset >= len(token_ids):
            return None
        before = self._decode(token_ids[self.prefix_offset:self.read_offset])
        after = self._decode(token_ids[self.prefix_offset:])
        if not final and (len(after) <= len(before) or after.endswith("\ufffd")):
            return None  # nothing new yet, or an incomplete character: wait for the next token
        checked_from = max(0, len(self.text) - self.holdback)
        self.text += after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        if self.stop and check_stop:
            best = None
            for stop in self.stop:
                at = self.text.find(stop, checked_from)
                if at != -1 and (best is None or at < best[0]):
                    best = (at, stop)
            if best is not None:
                self.text = self.text[: best[0]]
                self.emitted = min(self.emitted, len(self.text))
                self.stopped = True
                return best[1]
        return None

    def take_delta(self, final: bool) -> str:
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta

    @property
    def emitted_text(self) -> str:
        return self.text[: self.emitted]
