"""Chat and text completions: OpenAI requests onto the engine, engine outputs back into OpenAI responses.

``CompletionsService.chat`` / ``.completion`` take a validated request and return a JSON response or an SSE stream.
Order of work per request (each step can end it with an OpenAI-shaped error): model name -> unsupported fields ->
sampling parameters -> image count -> admission (503 when full) -> media fetch and decode (off the event loop) ->
``engine.generate``, whose first output is awaited before answering so that errors the engine raises at admission
(queue full, prompt longer than the context) get their HTTP status; after that, errors become an SSE error event.
A watcher on the connection aborts the engine request as soon as the client goes away (streaming or not); a
deadline (``request_timeout``) aborts it too. Usage comes from the final ``RequestOutput`` in both modes, so
streamed and non-streamed counts are identical: prompt tokens include image tokens, and
``prompt_tokens_details.cached_tokens`` says how many came from the prefix cache.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import re
import time
import uuid
from typing import Any, AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fastllava.engine.types import RequestOutput, SamplingParams
from fastllava.server.errors import APIError, bound, overloaded
from fastllava.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, to_sampling_params, \
    unknown_fields

logger = logging.getLogger("fastllava.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_CONTEXT_WORDS = re.compile(r"context|too long|max_model_len|maximum (model|sequence) length", re.I)


class ClientDisconnected(Exception):
    """The client closed the connection; the engine request has been aborted."""


_DETACHED: set[asyncio.Future] = set()


def _detach(value: Any) -> None:
    """Run an awaitable (if it is one) to completion on the loop, outside the current (maybe cancelled) task."""
    if inspect.isawaitable(value):
        task = asyncio.ensure_future(value)
        _DETACHED.add(task)
        task.add_done_callback(_DETACHED.discard)


async def _close(stream: Any, step: asyncio.Future | None) -> None:
    if step is not None:
        step.cancel()
        await asyncio.gather(step, return_exceptions=True)
    try:
        close = getattr(stream, "aclose", None)
        if close is not None:
            await close()
    except Exception:  # noqa: BLE001 - closing a stream that already failed
        pass


def engine_error(error: BaseException) -> APIError:
    """An exception from the engine as the client should see it."""
    if isinstance(error, APIError):
        return error
    from fastllava.engine import EngineDeadError, EngineError, EngineOverloadedError

    if isinstance(error, (EngineOverloadedError, asyncio.QueueFull)):
        return overloaded(f"The engine's queue is full; retry later ({bound(str(error), 200)})")
    if isinstance(error, EngineDeadError):
        return APIError(503, f"The engine is not running: {bound(str(error), 200)}", code="engine_unavailable",
                        type="server_error")
    if isinstance(error, ValueError) and not isinstance(error, EngineError):  # RequestError: the request's fault
        message = str(error)
        code = "context_length_exceeded" if _CONTEXT_WORDS.search(message) else "invalid_request"
        return APIError(400, message, code=code)
    logger.error("engine error: %s: %s", type(error).__name__, error)
    return APIError(500, f"The engine failed: {type(error).__name__}: {bound(str(error), 300)}",
                    code="internal_error", type="server_error")


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the ASGI server reports http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def to_conversation(messages: list[ChatMessage], images: list[Any]) -> list[dict[str, Any]]:
    """OpenAI messages -> the engine's conversation, with the already decoded PIL images in place of URLs."""
    conversation, it = [], iter(images)
    for message in messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            conversation.append({"role": role, "content": message.content or ""})
            continue
        parts = []
        for part in message.content:
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
            else:
                parts.append({"type": "image", "image": next(it)})
        conversation.append({"role": role, "content": parts})
    return conversation


def image_urls(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    """[(url, param)] of every image part, in order (param names where it is, for error messages)."""
    found = []
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type == "image_url":
                    found.append((part.url, f"messages[{i}].content[{j}].image_url.url"))
    return found


def usage_of(output: RequestOutput) -> dict[str, Any]:
    prompt, completion = output.prompt_tokens, output.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens,
                                      "image_tokens": output.num_image_tokens}}


class CompletionsService:
    def __init__(self, state: Any):
        self.state = state  # app state: engine, processor, settings, fetcher, admission, metrics
        self._token_cache: dict[int, str] = {}

    # ------------------------------------------------------------------------------------------------ helpers

    def _token_text(self, token_id: int) -> str:
        text = self._token_cache.get(token_id)
        if text is None:
            text = self.state.processor.tokenizer.decode([token_id])
            if len(self._token_cache) < 200_000:
                self._token_cache[token_id] = text
        return text

    def _check_common(self, body: ChatCompletionRequest | CompletionRequest, endpoint: str) -> SamplingParams:
        settings = self.state.settings
        if body.model is not None and body.model != settings.model_name:
            raise APIError(404, f"The model '{bound(body.model, 100)}' does not exist; this server serves "
                           f"'{settings.model_name}'", code="model_not_found", param="model")
        problems = body.unsupported_fields()
        if problems:
            raise APIError(400, "; ".join(problems), code="unsupported_parameter")
        if body.n > settings.max_n:
            raise APIError(400, f"n must be at most {settings.max_n}", code="invalid_request", param="n")
        ignored = unknown_fields(body)
        if ignored:
            logger.warning("%s: ignoring unknown field(s) %s", endpoint, ", ".join(map(repr, ignored)))
        try:
            default = settings.default_max_tokens if isinstance(body, ChatCompletionRequest) else None
            return to_sampling_params(body, default)
        except ValueError as error:
            raise APIError(400, str(error), code="invalid_request") from None

    def _logprobs_chat(self, entries: list[Any], top: int) -> list[dict[str, Any]]:
        content = []
        for entry in entries:
            token = self._token_text(entry.token_id)
            ranked = sorted(entry.top.items(), key=lambda kv: -kv[1])[:top]
            content.append({
                "token": token, "logprob": entry.logprob, "bytes": list(token.encode("utf-8")),
                "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp, "bytes": list(t.encode("utf-8"))}
                                 for i, lp in ranked],
            })
        return content

    def _logprobs_text(self, entries: list[Any], top: int, offset: int) -> dict[str, Any]:
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            token = self._token_text(entry.token_id)
            tokens.append(token)
            token_logprobs.append(entry.logprob)
            ranked = sorted(entry.top.items(), key=lambda kv: -kv[1])[:top]
            tops.append({self._token_text(i): lp for i, lp in ranked} if top else None)
            offsets.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}

    # --------------------------------------------------------------------------------------------- generation

    async def _outputs(self, request: Request, request_id: str, prompt: Any, params: SamplingParams,
                       deadline: float, watcher: asyncio.Task) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request; aborts it on disconnect, deadline, cancellation or any early exit.

        Nothing in the cleanup awaits: under a cancelled task (anyio cancels a stream whose client left) every await
        would be cancelled again, so the abort is called synchronously and the rest is left to a detached task.
        """
        engine = self.state.engine
        finished = False
        step: asyncio.Future | None = None
        stream = engine.generate(request_id, prompt, params)
        try:
            while True:
                step = asyncio.ensure_future(stream.__anext__())
                done, _ = await asyncio.wait({step, watcher}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    if watcher in done:
                        raise ClientDisconnected
                    raise APIError(504, f"The request did not finish within {self.state.settings.request_timeout:g} s "
                                   "(see --request-timeout)", code="request_timeout", type="server_error")
                try:
                    output = step.result()
                except StopAsyncIteration:
                    finished = True
                    return
                finally:
                    step = None
                if output.error:
                    finished = True
                    raise APIError(500, f"The engine failed: {bound(output.error, 300)}", code="internal_error",
                                   type="server_error")
                if output.finished:
                    finished = True
                    if any(o.finish_reason == "abort" for o in output.outputs):
                        raise APIError(503, "The engine aborted the request", code="request_aborted",
                                       type="server_error")
                yield output
                if finished:
                    return
        finally:
            if not finished:
                _detach(engine.abort(request_id))
            _detach(_close(stream, step))

    async def _run(self, request: Request, body: ChatCompletionRequest | CompletionRequest, endpoint: str,
                   prompt_of: Callable[[list[Any]], Any], urls: list[tuple[str, str]], id_prefix: str,
                   render: Callable[..., Any]) -> Response:
        state, metrics = self.state, self.state.metrics
        arrival = time.monotonic()
        params = self._check_common(body, endpoint)
        state.fetcher.check_count(len(urls))
        ticket = state.admission.admit(body.n)  # before any fetch, decode or tokenization
        request_id = f"{id_prefix}-{uuid.uuid4().hex}"
        deadline = arrival + state.settings.request_timeout
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        engine = state.engine

        def abort_on_disconnect(task: asyncio.Future) -> None:
            # Whatever the handler is awaiting at that moment (a send, the engine), the engine hears it now.
            if not task.cancelled() and task.exception() is None:
                _detach(engine.abort(request_id))

        watcher.add_done_callback(abort_on_disconnect)
        handed_over = False
        try:
            if urls:
                metrics.images.inc(len(urls))
                fetch = asyncio.ensure_future(state.fetcher.load_all(urls))
                started = time.monotonic()
                done, _ = await asyncio.wait({fetch, watcher}, timeout=max(0.0, deadline - started),
                                             return_when=asyncio.FIRST_COMPLETED)
                if fetch not in done:
                    fetch.cancel()
                    if watcher in done:
                        raise ClientDisconnected
                    raise APIError(504, "Fetching the request's images took longer than the request timeout",
                                   code="request_timeout", type="server_error")
                images = fetch.result()
                metrics.media_fetch.observe(time.monotonic() - started)
            else:
                images = []
            outputs = self._outputs(request, request_id, prompt_of(images), params, deadline, watcher)
            try:
                first = await outputs.__anext__()
            except StopAsyncIteration:
                raise APIError(500, "The engine returned no output", code="internal_error",
                               type="server_error") from None
            except (APIError, ClientDisconnected):
                raise
            except Exception as error:  # noqa: BLE001 - engine errors at admission get their HTTP status
                raise engine_error(error) from None
            metrics.ttft.observe(time.monotonic() - arrival)
            if body.stream:
                handed_over = True
                stream = self._stream(body, request_id, first, outputs, render, ticket, watcher, arrival, endpoint)
                return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
            final = first
            last = time.monotonic()
            async for final in outputs:  # noqa: B007 - the last one is the answer
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
            self._account(final, arrival)
            metrics.requests.labels(endpoint, "200").inc()
            return JSONResponse(render(final, request_id))
        except ClientDisconnected:
            metrics.disconnects.inc()
            metrics.requests.labels(endpoint, "499").inc()
            logger.info("%s: client disconnected, request %s aborted", endpoint, request_id)
            return Response(status_code=499)
        except Exception as error:  # noqa: BLE001 - metered and turned into an OpenAI error by the route
            raise engine_error(error) from None
        finally:
            if not handed_over:
                watcher.cancel()
                ticket.release()

    def _account(self, final: RequestOutput, arrival: float) -> None:
        metrics = self.state.metrics
        metrics.prompt_tokens.inc(final.prompt_tokens)
        metrics.cached_tokens.inc(final.num_cached_tokens)
        metrics.generation_tokens.inc(final.completion_tokens)
        metrics.e2e.observe(time.monotonic() - arrival)

    async def _stream(self, body: Any, request_id: str, first: RequestOutput, outputs: AsyncIterator[RequestOutput],
                      render: Callable[..., Any], ticket: Any, watcher: asyncio.Task, arrival: float,
                      endpoint: str) -> AsyncIterator[str]:
        metrics = self.state.metrics
        sent: dict[int, tuple[int, int]] = {}  # choice index -> (chars of text sent, logprob entries sent)
        status = "200"
        try:
            for chunk in render(None, request_id, start=True):
                yield f"data: {json.dumps(chunk)}\n\n"
            output, last = first, time.monotonic()
            while True:
                for chunk in render(output, request_id, sent=sent):
                    yield f"data: {json.dumps(chunk)}\n\n"
                if output.finished:
                    break
                try:
                    output = await outputs.__anext__()
                except StopAsyncIteration:
                    break
                now = time.monotonic()
                metrics.itl.observe(now - last)
                last = now
            self._account(output, arrival)
            if body.include_usage():
                yield f"data: {json.dumps(render(output, request_id, usage_only=True))}\n\n"
            yield "data: [DONE]\n\n"
        except (ClientDisconnected, asyncio.CancelledError) as error:
            status = "499"
            metrics.disconnects.inc()
            logger.info("%s: client disconnected mid-stream, request %s aborted", endpoint, request_id)
            if isinstance(error, asyncio.CancelledError):
                raise
        except Exception as error:  # noqa: BLE001 - after the headers went out, errors travel as SSE events
            api_error = engine_error(error)
            status = str(api_error.status)
            metrics.rejected.labels(api_error.code or "error").inc()
            yield api_error.sse()
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            await outputs.aclose()  # aborts the engine request if it is still running (e.g. cancelled send)
            ticket.release()
            metrics.requests.labels(endpoint, status).inc()

    # ------------------------------------------------------------------------------------------- the endpoints

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        created = int(time.time())
        model = self.state.settings.model_name
        top = body.top_logprobs or 0

        def render(output: RequestOutput | None, request_id: str, start: bool = False, sent: dict | None = None,
                   usage_only: bool = False) -> Any:
            head = {"id": request_id, "created": created, "model": model}
            if usage_only:
                return {**head, "object": "chat.completion.chunk", "choices": [], "usage": usage_of(output)}
            if start:
                return [{**head, "object": "chat.completion.chunk", "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]} | ({"usage": None} if body.include_usage() else {})
                    for i in range(body.n)]
            if sent is None:  # the whole answer
                choices = [{
                    "index": o.index,
                    "message": {"role": "assistant", "content": o.text},
                    "logprobs": {"content": self._logprobs_chat(o.logprobs or [], top)} if body.logprobs else None,
                    "finish_reason": o.finish_reason,
                } for o in output.outputs]
                return {**head, "object": "chat.completion", "choices": choices, "usage": usage_of(output)}
            chunks = []
            for o in output.outputs:
                chars, entries = sent.get(o.index, (0, 0))
                delta = o.text[chars:] if len(o.text) >= chars else o.text_delta
                new_logprobs = (o.logprobs or [])[entries:]
                if not delta and not o.finished and not new_logprobs:
                    continue
                sent[o.index] = (len(o.text), entries + len(new_logprobs))
                chunk = {**head, "object": "chat.completion.chunk", "choices": [{
                    "index": o.index, "delta": {"content": delta} if delta else {},
                    "logprobs": {"content": self._logprobs_chat(new_logprobs, top)} if body.logprobs else None,
                    "finish_reason": o.finish_reason}]}
                if body.include_usage():
                    chunk["usage"] = usage_of(output) if body.stream_options.continuous_usage_stats else None
                chunks.append(chunk)
            return chunks

        return await self._run(request, body, "chat", lambda images: to_conversation(body.messages, images),
                               image_urls(body.messages), "chatcmpl", render)

    async def completion(self, request: Request, body: CompletionRequest) -> Response:
        created = int(time.time())
        model = self.state.settings.model_name
        top = body.logprobs or 0
        prompt = body.prompt_text()

        def render(output: RequestOutput | None, request_id: str, start: bool = False, sent: dict | None = None,
                   usage_only: bool = False) -> Any:
            head = {"id": request_id, "object": "text_completion", "created": created, "model": model}
            if usage_only:
                return {**head, "choices": [], "usage": usage_of(output)}
            if start:
                return []
            if sent is None:
                choices = [{
                    "index": o.index, "text": o.text,
                    "logprobs": self._logprobs_text(o.logprobs or [], top, 0) if body.logprobs is not None else None,
                    "finish_reason": o.finish_reason,
                } for o in output.outputs]
                return {**head, "choices": choices, "usage": usage_of(output)}
            chunks = []
            for o in output.outputs:
                chars, entries = sent.get(o.index, (0, 0))
                delta = o.text[chars:] if len(o.text) >= chars else o.text_delta
                new_logprobs = (o.logprobs or [])[entries:]
                if not delta and not o.finished and not new_logprobs:
                    continue
                sent[o.index] = (len(o.text), entries + len(new_logprobs))
                chunk = {**head, "choices": [{
                    "index": o.index, "text": delta,
                    "logprobs": self._logprobs_text(new_logprobs, top, chars) if body.logprobs is not None else None,
                    "finish_reason": o.finish_reason}]}
                if body.include_usage():
                    chunk["usage"] = usage_of(output) if body.stream_options.continuous_usage_stats else None
                chunks.append(chunk)
            return chunks

        return await self._run(request, body, "completions", lambda images: prompt, [], "cmpl", render)
