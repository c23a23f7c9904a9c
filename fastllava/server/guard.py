"""The server's front door, a pure ASGI middleware: Host check, API key check, bounded uploads, bounded bodies.

Runs before any routing or parsing. With ``trusted_hosts`` set (the CLI sets it when binding to loopback), a request
whose Host header names another host gets a 400: a web page that rebinds its own domain to 127.0.0.1 (DNS rebinding)
cannot reach the server as a same-origin site. With an API key configured, every path except the health check and
the static chat page needs ``Authorization: Bearer KEY`` (compared in constant time) or gets a 401 before its body
is read.
At most ``max_concurrent_bodies`` requests with a body are handled at once (more get an OpenAI-shaped 503 with
Retry-After before their body is read), so the memory held by request bodies stays below that many times
``max_body_bytes``. A body larger than ``max_body_bytes`` gets a 413: at once when Content-Length says so,
otherwise as soon as the bytes read pass the limit (chunked uploads), without reading the rest. The body is read
here and replayed to the app, so what the app parses is exactly what was counted; later ``receive`` calls go to
the server (disconnect detection).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable

from fastllava.server.errors import APIError, overloaded

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/", "/health", "/favicon.ico", "/page-config.json"})
PUBLIC_PREFIXES = ("/static/",)


async def send_error(send: Send, error: APIError, close: bool = False) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Guard:
    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, max_concurrent_bodies: int = 1 << 30,
                 on_reject: Callable[[str], None] = lambda reason: None, retry_after: int = 1,
                 trusted_hosts: frozenset[str] | None = None):
        self.app = app
        self.trusted_hosts = trusted_hosts
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.max_concurrent_bodies = max_concurrent_bodies
        self.active_bodies = 0  # one event loop: no lock needed
        self.on_reject = on_reject
        self.retry_after = retry_after

    def _authorized(self, scope: Scope) -> bool:
        if self.api_key is None:
            return True
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _trusted_host(self, scope: Scope) -> bool:
        if self.trusted_hosts is None:
            return True
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
                host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]
                return host.rstrip(".") in self.trusted_hosts
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self._trusted_host(scope):
            self.on_reject("invalid_host")
            await send_error(send, APIError(400, "This server does not answer to that Host name (see --allowed-hosts)",
                                            code="invalid_host"), close=True)
            return
        if not self._authorized(scope):
            self.on_reject("invalid_api_key")
            await send_error(send, APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'",
                                            code="invalid_api_key", type="invalid_request_error"), close=True)
            return
        too_large = APIError(413, f"The request body is larger than the server's limit of {self.max_body_bytes} "
                             "bytes (see --max-body-bytes)", code="request_too_large")
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_body_bytes or declared < 0:
                    self.on_reject("request_too_large" if declared >= 0 else "invalid_request")
                    await send_error(send, too_large if declared >= 0 else
                                     APIError(400, "invalid Content-Length", code="invalid_request"), close=True)
                    return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        if self.active_bodies >= self.max_concurrent_bodies:
            self.on_reject("server_overloaded")
            await send_error(send, overloaded(f"The server is handling {self.active_bodies} requests; retry later",
                                              self.retry_after), close=True)
            return
        self.active_bodies += 1
        try:
            await self._with_body(scope, receive, send, too_large)
        finally:
            self.active_bodies -= 1

    async def _with_body(self, scope: Scope, receive: Receive, send: Send, too_large: APIError) -> None:
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                self.on_reject("request_too_large")
                await send_error(send, too_large, close=True)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
