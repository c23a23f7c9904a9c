"""Stop strings: a sequence ends at the token that completes one of them (that token is kept, as transformers
does). Only a tail of the new tokens is decoded per step, so checking stays cheap for long answers."""

from __future__ import annotations

from typing import Any, Sequence


class StopStringMatcher:
    def __init__(self, stop_strings: Sequence[str] | str | None, tokenizer: Any):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stop_strings = [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need the tokenizer: pass tokenizer=processor.tokenizer to generate()")
        self.tokenizer = tokenizer
        # A stop string spans at most len(s) tokens; a few more cover tokens that decode to nothing.
        self.window = max((len(s) for s in self.stop_strings), default=0) + 4

    def __bool__(self) -> bool:
        return bool(self.stop_strings)

    def completed_by_last_token(self, new_tokens: list[int]) -> bool:
        """Does the latest token finish a stop string (one not already complete before it)?"""
        tail = new_tokens[-self.window:]
        text = self.tokenizer.decode(tail, skip_special_tokens=False)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        return any(s in text and text.rfind(s) + len(s) > len(before) for s in self.stop_strings)
