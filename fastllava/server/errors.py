"""Errors of the HTTP server, always in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``APIError(status, message, code=..., param=..., headers=...)`` is raised anywhere in the server and turned into a
JSON response (or, once a stream has started, into an SSE ``data: {"error": ...}`` event) by the handlers installed
with ``install_error_handlers``. ``code`` is a string id as OpenAI's (``"context_length_exceeded"``,
``"too_many_images"``, ``"server_overloaded"`` ...). Messages are bounded: a validation error never echoes the
offending input, so a huge or hostile body cannot be reflected back or blow up the response.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

logger = logging.getLogger("fastllava.server")

MAX_MESSAGE_CHARS = 1000
MAX_VALIDATION_ERRORS = 5

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """An error a client is told about: HTTP status, OpenAI error type and a string code."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = bound(message)
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """The error as a server-sent event (for errors after a stream has begun)."""
        return f"data: {json.dumps(self.body())}\n\n"


def bound(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 15] + " ...(truncated)"


def overloaded(message: str, retry_after: int = 1) -> APIError:
    return APIError(503, message, code="server_overloaded", type="server_error",
                    headers={"Retry-After": str(max(1, int(retry_after)))})


def _param(loc: Iterable[Any]) -> str | None:
    """pydantic's location ('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for item in loc:
        if item == "body" and not out:
            continue
        if isinstance(item, int):
            out += f"[{item}]"
        else:
            out += ("." if out else "") + bound(str(item), 60)
    return out or None


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A bounded 400 from pydantic/FastAPI validation errors: at most 5 of them, never their inputs."""
    if errors and errors[0].get("type") == "json_invalid":
        ctx = errors[0].get("ctx") or {}
        detail = bound(str(ctx.get("error", "invalid JSON")), 200)
        return APIError(400, f"The request body is not valid JSON: {detail}", code="invalid_json")
    parts = []
    for error in errors[:MAX_VALIDATION_ERRORS]:
        where = _param(error.get("loc", ())) or "body"
        parts.append(f"{where}: {bound(str(error.get('msg', 'invalid value')), 200)}")
    more = len(errors) - MAX_VALIDATION_ERRORS
    if more > 0:
        parts.append(f"... and {more} more error(s)")
    first = errors[0] if errors else {}
    return APIError(400, "Invalid request: " + "; ".join(parts), code="invalid_request",
                    param=_param(first.get("loc", ())))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(list(error.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = error.detail if isinstance(error.detail, str) else "HTTP error"
        if error.status_code == 404:
            message = f"No route {request.method} {bound(request.url.path, 200)}"
        return APIError(error.status_code, message, code=code, headers=dict(error.headers or {})).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error while serving %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error ({type(error).__name__})", code="internal_error").response()
