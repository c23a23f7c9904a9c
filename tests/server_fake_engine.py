"""TEST DOUBLE of fastllava.engine.AsyncEngine for the server tests (never used by the package).

It forces situations the real engine makes hard to reach on purpose: a full queue, an error in the middle of a stream,
slow generation (to disconnect mid-way), a blocked model load. It speaks the engine's interface: ``start()``,
``shutdown()``, ``async generate(request_id, conversation_or_prompt, sampling_params)`` yielding cumulative
``RequestOutput``s, ``abort(request_id)`` and ``stats()``; tokens are words of a tiny vocabulary, one per step.
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Any, AsyncIterator

from fastllava.engine.types import CompletionOutput, RequestOutput, SamplingParams, TokenLogprob

VOCAB = [" alpha", " beta", " gamma", " delta", " red", " square", " circle", " blue", " one", " two", ".", " the"]
IMAGE_TOKENS = 16


# what the real engine raises when it is full
from fastllava.engine import EngineOverloadedError as QueueFullError  # noqa: E402


class FakeTokenizer:
    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return "".join(VOCAB[i % len(VOCAB)] for i in ids)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": ([1] if add_special_tokens else []) + [5] * len(text.split())}


class FakeProcessor:
    tokenizer = FakeTokenizer()

    def apply_chat_template(self, conversation: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, return_dict: bool = False, **unused: Any) -> Any:
        ids = prompt_ids(conversation)
        return {"input_ids": [ids]} if return_dict else ids


def prompt_ids(prompt: Any) -> list[int]:
    """Fake tokenization: one id per word, IMAGE_TOKENS per image, 3 per message (the 'template')."""
    if isinstance(prompt, str):
        return [1] + [5] * len(prompt.split())
    ids = [1]
    for message in prompt:
        ids += [2, 3, 4]
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for part in parts:
            if part["type"] == "text":
                ids += [5] * len(part["text"].split())
            else:
                assert hasattr(part["image"], "size"), "the server must hand decoded PIL images to the engine"
                ids += [9] * IMAGE_TOKENS
    return ids


class FakeEngine:
    def __init__(self, step_delay: float = 0.0, capacity: int = 1000, fail_after: int | None = None,
                 default_max_tokens: int = 200, max_model_len: int = 512):
        self.step_delay = step_delay
        self.capacity = capacity
        self.fail_after = fail_after
        self.default_max_tokens = default_max_tokens
        self.max_model_len = max_model_len
        self.started = False
        self.live: dict[str, dict[str, Any]] = {}  # request id -> state ("KV memory" the test checks is freed)
        self.aborted: list[str] = []
        self.steps_after_abort: dict[str, int] = {}
        self.conversations: list[Any] = []
        self.tokens_generated = 0
        self.finished_requests = 0

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.started = False

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if request_id in self.live:
            self.live[request_id]["aborted"] = True

    def stats(self) -> dict[str, Any]:
        # the shape of the real engine's stats (nested dicts included)
        return {"num_running": len(self.live), "num_waiting": 0, "tokens_generated": self.tokens_generated,
                "prefix_cache": {"hits": 3, "misses": 1, "hit_tokens": 30, "queried_tokens": 40},
                "kv_cache": {"used_bytes": 1024 * len(self.live), "cached_bytes": 0, "dtype": "float32"}}

    def _token(self, rng: random.Random | None, base: int, step: int, index: int) -> int:
        if rng is None:
            return (base + step + index) % len(VOCAB)
        return rng.randrange(len(VOCAB))

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if len(self.live) >= self.capacity:
            raise QueueFullError(f"queue full ({self.capacity} requests)")
        ids = prompt_ids(prompt)
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.max_model_len} tokens; the prompt has "
                             f"{len(ids)} tokens and max_tokens is {params.max_tokens}")
        self.conversations.append(prompt)
        state = self.live[request_id] = {"aborted": False}
        images = sum(1 for i in ids if i == 9)
        base = len(ids)
        rngs = [None if params.greedy else random.Random(None if params.seed is None else params.seed * 1000 + i)
                for i in range(params.n)]
        outs = [CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
                for i in range(params.n)]
        limit = params.max_tokens or self.default_max_tokens
        step = 0
        try:
            while True:
                await asyncio.sleep(self.step_delay)
                if state["aborted"]:
                    self.steps_after_abort[request_id] = self.steps_after_abort.get(request_id, 0) + 1
                    for o in outs:
                        o.finish_reason = o.finish_reason or "abort"
                    yield RequestOutput(request_id, outs, ids, images, 0, finished=True)
                    return
                if self.fail_after is not None and step >= self.fail_after:
                    raise RuntimeError("simulated engine failure")
                for i, o in enumerate(outs):
                    o.text_delta, o.token_ids_delta = "", []
                    if o.finished:
                        continue
                    token = self._token(rngs[i], base, step, i)
                    piece = VOCAB[token]
                    o.token_ids.append(token)
                    o.token_ids_delta = [token]
                    self.tokens_generated += 1
                    if o.logprobs is not None:
                        top = {t: math.log(0.5 / (r + 1)) for r, t in enumerate([token, (token + 1) % len(VOCAB),
                                                                               (token + 2) % len(VOCAB)])}
                        o.logprobs.append(TokenLogprob(token, top[token], dict(list(top.items())[:params.logprobs])))
                    text = o.text + piece
                    hit = next((s for s in (params.stop or []) if s in text), None)
                    if hit is not None:
                        text = text[: text.index(hit)]
                        o.finish_reason, o.stop_reason = "stop", hit
                    elif len(o.token_ids) >= limit:
                        o.finish_reason = "length"
                    o.text_delta = text[len(o.text):]
                    o.text = text
                step += 1
                done = all(o.finished for o in outs)
                yield RequestOutput(request_id, outs, ids, images, num_cached_tokens=min(4, len(ids)), finished=done)
                if done:
                    self.finished_requests += 1
                    return
        finally:
            self.live.pop(request_id, None)


# ------------------------------------------------------------------------------------ harness: a live server


class LiveServer:
    """uvicorn serving an app on a free loopback port in a background thread (real HTTP, real disconnects)."""

    def __init__(self, app: Any):
        import socket
        import threading

        import uvicorn

        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "LiveServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self._sock.close()

    def wait_ready(self, timeout: float = 20) -> None:
        import http.client
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
            time.sleep(0.02)
        raise RuntimeError("the test server never became healthy")
