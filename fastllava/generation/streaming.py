"""Streamers: receive token ids as they are generated and turn them into text chunks.

The protocol is transformers': ``put(ids)`` (the prompt first, then each new token batch) and ``end()``.
``TextIteratorStreamer`` is an iterator of text chunks for another thread (a queue, optional timeout);
``TextStreamer`` prints. Text is emitted only once it is stable: a chunk that ends in an incomplete UTF-8
sequence (decoded as U+FFFD) is held back until the next token completes it.
"""

from __future__ import annotations

import queue
import sys
from typing import Any


class TextStreamer:
    def __init__(self, tokenizer: Any, skip_prompt: bool = False, **decode_kwargs: Any):
        self.tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor works too
        self.skip_prompt = skip_prompt
        self.decode_kwargs = decode_kwargs
        self._tokens: list[int] = []
        self._emitted = 0
        self._prompt_pending = True

    def put(self, value: Any) -> None:
        ids = value.tolist() if hasattr(value, "tolist") else list(value)
        if ids and isinstance(ids[0], list):
            if len(ids) > 1:
                raise ValueError("streamers support batch size 1 only")
            ids = ids[0]
        if self._prompt_pending and self.skip_prompt:
            self._prompt_pending = False
            return
        self._prompt_pending = False
        self._tokens.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return
        self.on_text(text[self._emitted:], stream_end=False)
        self._emitted = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self._tokens, **self.decode_kwargs) if self._tokens else ""
        self.on_text(text[self._emitted:], stream_end=True)
        self._tokens, self._emitted, self._prompt_pending = [], 0, True

    def on_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="" if not stream_end else "\n", file=sys.stdout)


class TextIteratorStreamer(TextStreamer):
    """Iterate over text chunks while generate() runs in another thread."""

    _END = object()

    def __init__(self, tokenizer: Any, skip_prompt: bool = False, timeout: float | None = None, **decode_kwargs: Any):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue: queue.Queue = queue.Queue()
        self.timeout = timeout

    def on_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            self.text_queue.put(self._END, timeout=self.timeout)

    def __iter__(self) -> "TextIteratorStreamer":
        return self

    def __next__(self) -> str:
        value = self.text_queue.get(timeout=self.timeout)
        if value is self._END:
            raise StopIteration
        return value
