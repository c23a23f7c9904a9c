"""The FastAPI application: routes, app state, model loading in the background, and the static chat page.

``create_app(settings, loader)`` returns an ASGI app (FastAPI wrapped by the ``Guard`` of guard.py). ``loader()``
returns ``(engine, processor)`` and runs in a worker thread after the server starts, so ``/health`` answers 503
("loading") at once and 200 when the engine has started; inference endpoints answer 503 + Retry-After meanwhile.
The engine is the only thing that runs models: this module parses requests (bounded JSON, pydantic), hands them to
``CompletionsService`` and answers ``/v1/models``, ``/tokenize``, ``/metrics``, ``/health`` and the page at ``/``.

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /v1/models/{id}, POST /tokenize,
GET /health, GET /metrics, GET / (web chat page, files under /static/).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from fastllava.server.admission import Admission
from fastllava.server.completions import CompletionsService, image_urls, to_conversation
from fastllava.server.errors import APIError, install_error_handlers, validation_error
from fastllava.server.guard import Guard
from fastllava.server.media import MediaFetcher
from fastllava.server.metrics import ServerMetrics
from fastllava.server.protocol import ChatCompletionRequest, CompletionRequest, TokenizeRequest
from fastllava.server.settings import ServerSettings

logger = logging.getLogger("fastllava.server")

STATIC_DIR = Path(__file__).parent / "static"
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob: http: https:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

Loader = Callable[[], tuple[Any, Any]]


class ServerState:
    """What the routes share: settings, the engine and processor once loaded, media fetcher, admission, metrics."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.engine: Any = None
        self.processor: Any = None
        self.ready = False
        self.load_error: str | None = None
        self.created = int(time.time())
        self.metrics = ServerMetrics(lambda: self.engine if self.ready else None)
        self.admission = Admission(settings.max_in_flight, settings.retry_after, self.metrics.in_flight.set)
        self.fetcher = MediaFetcher(settings.media)

    def require_ready(self) -> None:
        if self.load_error is not None:
            raise APIError(503, f"The model failed to load: {self.load_error}", code="model_load_failed",
                           type="server_error")
        if not self.ready:
            raise APIError(503, "The model is still loading; retry shortly", code="model_loading",
                           type="server_error", headers={"Retry-After": "5"})

    def max_model_len(self) -> int | None:
        if self.settings.max_model_len is not None:
            return self.settings.max_model_len
        for owner in (self.engine, getattr(self.engine, "config", None)):
            value = getattr(owner, "max_model_len", None)
            if isinstance(value, int):
                return value
        return None


async def _start_engine(state: ServerState, loader: Loader, on_failure: Callable[[str], None] | None) -> None:
    try:
        engine, processor = await asyncio.to_thread(loader)
        started = engine.start() if hasattr(engine, "start") else None
        if inspect.isawaitable(started):
            await started
        state.engine, state.processor, state.ready = engine, processor, True
        logger.info("model '%s' loaded; serving", state.settings.model_name)
    except (Exception, SystemExit) as error:  # noqa: BLE001 - reported by /health and every endpoint
        state.load_error = str(error) if isinstance(error, SystemExit) else f"{type(error).__name__}: {error}"
        logger.error("loading the model failed: %s", state.load_error,
                     exc_info=not isinstance(error, (SystemExit, FileNotFoundError, OSError, ValueError)))
        if on_failure is not None:
            on_failure(state.load_error)


def _parse(model: type[BaseModel], raw: bytes, content_type: str | None = None) -> Any:
    """A request body as ``model``: malformed JSON or invalid fields give a bounded 400 that never echoes input.

    A body declared as something other than JSON is refused (415): the content types a web page may send to another
    origin without asking (forms, text/plain) never reach the model, so another site cannot make the browser of
    someone on this machine use the server (cross-site request forgery)."""
    if content_type:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise APIError(415, "Send the request body as JSON with 'Content-Type: application/json'",
                           code="unsupported_media_type")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        detail = error.msg if isinstance(error, json.JSONDecodeError) else type(error).__name__
        position = f" at character {error.pos}" if isinstance(error, json.JSONDecodeError) else ""
        raise APIError(400, f"The request body is not valid JSON: {detail}{position}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error.errors(include_input=False, include_url=False)) from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply", code="invalid_request") from None


def create_app(settings: ServerSettings, loader: Loader, on_load_failure: Callable[[str], None] | None = None) -> Any:
    """The ASGI app. ``loader()`` -> (engine, processor) runs in a thread once the server is up; if it fails,
    /health and every endpoint say why (503) and ``on_load_failure(message)`` is called (the CLI then exits)."""
    state = ServerState(settings)
    service = CompletionsService(state)
    background: set[asyncio.Task] = set()

    async def lifespan(app: FastAPI):
        task = asyncio.create_task(_start_engine(state, loader, on_load_failure))
        background.add(task)
        try:
            yield
        finally:
            task.cancel()
            if state.engine is not None and hasattr(state.engine, "shutdown"):
                result = state.engine.shutdown()
                if inspect.isawaitable(result):
                    await result
            state.fetcher.close()

    app = FastAPI(title="fastllava", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_error_handlers(app)

    async def metered(endpoint: str, handler: Callable[[], Any]) -> Response:
        try:
            return await handler()
        except APIError as error:
            state.metrics.requests.labels(endpoint, str(error.status)).inc()
            state.metrics.rejected.labels(error.code or "error").inc()
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        async def handle() -> Response:
            body = _parse(ChatCompletionRequest, await request.body(), request.headers.get("content-type"))
            state.require_ready()
            return await service.chat(request, body)
        return await metered("chat", handle)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        async def handle() -> Response:
            body = _parse(CompletionRequest, await request.body(), request.headers.get("content-type"))
            state.require_ready()
            return await service.completion(request, body)
        return await metered("completions", handle)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        async def handle() -> Response:
            body = _parse(TokenizeRequest, await request.body(), request.headers.get("content-type"))
            problems = body.unsupported_fields()
            if problems:
                raise APIError(400, "; ".join(problems), code="invalid_request")
            if body.model is not None and body.model != settings.model_name:
                raise APIError(404, f"The model '{body.model[:100]}' does not exist", code="model_not_found",
                               param="model")
            state.require_ready()
            processor = state.processor
            if body.prompt is not None:
                ids = await asyncio.to_thread(
                    lambda: processor.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
            else:
                urls = image_urls(body.messages)
                state.fetcher.check_count(len(urls))
                ticket = state.admission.admit(1)
                try:
                    images = await state.fetcher.load_all(urls)
                    conversation = to_conversation(body.messages, images)
                    ids = await asyncio.to_thread(lambda: processor.apply_chat_template(
                        conversation, add_generation_prompt=body.add_generation_prompt, tokenize=True,
                        return_dict=True)["input_ids"])
                finally:
                    ticket.release()
            ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
            if ids and isinstance(ids[0], list):
                ids = ids[0]
            state.metrics.requests.labels("tokenize", "200").inc()
            return JSONResponse({"count": len(ids), "max_model_len": state.max_model_len(), "tokens": ids})
        return await metered("tokenize", handle)

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": state.created, "owned_by": "fastllava",
                "max_model_len": state.max_model_len(), "capabilities": ["completion", "multimodal"]}

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> Response:
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id[:100]}' does not exist", code="model_not_found", param="model")
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> Response:
        try:
            state.require_ready()
        except APIError as error:
            return error.response()
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        payload, content_type = state.metrics.render()
        return Response(payload, media_type=content_type)

    @app.get("/")
    async def page() -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})

    @app.get("/page-config.json")
    async def page_config() -> Response:
        """What the chat page needs to know (no secrets): the model id, whether a key is needed, the image limit."""
        return JSONResponse({"model": settings.model_name, "needs_api_key": settings.api_key is not None,
                             "max_images": settings.media.max_images, "max_image_bytes": settings.media.max_bytes})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def on_reject(reason: str) -> None:
        state.metrics.rejected.labels(reason).inc()

    guarded = Guard(app, settings.api_key, settings.max_body_bytes, settings.body_concurrency, on_reject,
                    settings.retry_after, settings.trusted_hosts)
    guarded.state = state  # for tests and the CLI
    return guarded
