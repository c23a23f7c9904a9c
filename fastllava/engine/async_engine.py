"""AsyncEngine: the Engine on a background thread, awaited and streamed from asyncio (what the server uses).

Contract::

    engine = AsyncEngine(Engine(model, processor, ...), max_queued_requests=64); engine.start()
    async for out in engine.generate("id", conversation, SamplingParams(...)):   # RequestOutput per step
        send(out.outputs[0].text_delta)
    engine.abort("id"); engine.stats(); engine.shutdown()

One thread owns the Engine and runs ``step()`` while there is work; ``generate``/``abort`` only post commands
to it (a thread-safe queue), so the event loop never waits for a model step, and any thread may call them.
Outputs reach each stream's asyncio queue through ``loop.call_soon_threadsafe``. Admission is bounded: at most
``max_num_seqs + max_queued_requests`` requests are in flight; one more raises ``EngineOverloadedError`` at once
(the server answers 503), before any image is fetched or decoded. A stream that is closed or cancelled before it
finished (a client that went away) aborts its request, which frees its memory within one step. An error inside
a step fails the requests then running (their streams raise ``EngineError``) and the engine goes on; a request that cannot be
served as given (a bad image, a prompt longer than the context) raises ``RequestError``, a ValueError (HTTP 400).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any, AsyncIterator

from fastllava.engine.engine import Engine, RequestError, error_message
from fastllava.engine.types import RequestOutput, SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many requests are queued; retry later (HTTP 503)."""


class EngineError(RuntimeError):
    """The engine failed while running this request (not the request's fault)."""


class EngineDeadError(RuntimeError):
    """The engine is not running (never started, or shut down)."""


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody is listening any more
            pass


class AsyncEngine:
    def __init__(self, model: Any, processor: Any = None, *, max_queued_requests: int = 64, **engine_kwargs: Any):
        """``AsyncEngine(model, processor, **Engine options)`` or ``AsyncEngine(engine)``."""
        engine = model if isinstance(model, Engine) else Engine(model, processor, **engine_kwargs)
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self.max_in_flight = engine.scheduler.max_num_seqs + max_queued_requests
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats: dict[str, Any] = engine.stats()
        self._engine_failures: set[str] = set()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "AsyncEngine":
        if self._thread is None or not self._thread.is_alive():
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="fastllava-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the loop after the current step; unfinished streams raise EngineDeadError."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()

    # -- requests ------------------------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: Any,
                       sampling_params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs, one per step with new tokens, the last with ``finished=True``."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running: call start() first")
        request_id = str(request_id)
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self._streams) >= self.max_in_flight:
                raise EngineOverloadedError(
                    f"the server is overloaded: {len(self._streams)} requests in flight (max_num_seqs + "
                    f"max_queued_requests = {self.max_in_flight}); retry later"
                )
            self._streams[request_id] = stream
        self._post(("add", request_id, prompt, sampling_params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, RequestOutput) and item.error is not None:
                    finished = True
                    if request_id in self._engine_failures:
                        self._engine_failures.discard(request_id)
                        raise EngineError(item.error)
                    raise RequestError(item.error)  # the request's own fault (bad image, too long...): HTTP 400
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Abort a request (from any thread); its stream ends with finish_reason "abort"."""
        self._post(("abort", str(request_id)))

    def stats(self) -> dict[str, Any]:
        """The engine's counters as of its last step (plus the streams in flight)."""
        with self._lock:
            return {**self._stats, "in_flight": len(self._streams), "max_in_flight": self.max_in_flight}

    def _post(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _deliver(self, output: RequestOutput | BaseException, request_id: str) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is not None:
            stream.put(output)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt, params = command
                try:
                    self.engine.add_request(request_id, prompt, params)
                except Exception as error:  # noqa: BLE001 - the caller's arguments: fail that stream alone
                    self._deliver(RequestOutput(request_id, [], finished=True, error=error_message(error)), request_id)
            else:
                self.engine.abort(command[1])

    def _loop(self) -> None:
        while not self._stopping:
            self._run_commands()
            if not self.engine.has_unfinished_requests():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - keep serving: fail what was running, go on
                logger.exception("engine step failed")
                with self._lock:
                    self._engine_failures.update(self.engine.requests)
                self.engine.fail_all(EngineError(f"the engine failed while running this request: {error}"))
                continue  # the error outputs come with the next step
            for output in outputs:
                self._deliver(output, output.request_id)
            stats = self.engine.stats()
            with self._lock:
                self._stats = stats
