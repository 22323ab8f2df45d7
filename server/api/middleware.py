"""Pure ASGI middleware (streaming-safe): request ids, access logs and metrics; body size caps."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError, internal_error, too_large
from server.api.serving import SSE_DONE, sse_error
from server.observability.logging import request_id_var
from server.observability.metrics import Metrics

log = logging.getLogger("deltaserve.access")
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestContextMiddleware:
    """Gives each request an id (X-Request-ID, echoed back), logs one access line, counts and times it.

    It is also the one catch-all of the app: an exception no route handled (raised in a route, in an
    inner middleware or while streaming) is logged with its traceback and answered in OpenAI's shape
    (`internal_error`, no internal text) instead of a plain-text 500 and a closed connection. A stream
    that already began gets an error event and `[DONE]`; the keep-alive connection stays usable.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        token = request_id_var.set(request_id)
        started, response = time.perf_counter(), _Response()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            response.note(message)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the catch-all: any failure leaves in OpenAI shape
            await _answer_failure(scope, exc, response, send_with_id)
        finally:
            self._record(scope, response.status, time.perf_counter() - started)
            request_id_var.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.request_latency.labels(route).observe(seconds)
        log.info(
            "%s %s %d %.1fms",
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
            },
        )


class _Response:
    """What has gone out of one response so far."""

    def __init__(self) -> None:
        self.status, self.started, self.ended, self.event_stream = 500, False, False, False

    def note(self, message: Message) -> None:
        """Record what one outgoing ASGI message says about the response."""
        if message["type"] == "http.response.start":
            self.status, self.started = message["status"], True
            self.event_stream = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in message.get("headers", [])
            )
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.ended = True


async def _answer_failure(scope: Scope, exc: Exception, response: _Response, send: Send) -> None:
    """The answer to an exception that escaped the app: its APIError, else a 500 without internal text."""
    error = exc if isinstance(exc, APIError) else internal_error()
    if not isinstance(exc, APIError):
        log.error("unhandled error serving %s %s", scope["method"], scope["path"], exc_info=exc)
    if not response.started:
        await send_error(send, error)
    elif not response.ended:
        tail = f"{sse_error(error)}{SSE_DONE}".encode() if response.event_stream else b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            if CLIENT_REQUEST_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex


class BodyLimitMiddleware:
    """413 in OpenAI's shape when a body exceeds its path's limit (by Content-Length or as it streams).

    A streamed (chunked) body is cut off at the limit: whatever the app answers then (FastAPI turns a
    failed body read into a 400) is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        if _declared_length(scope) > limit:
            await send_error(send, too_large(limit))
            return
        received, answered, passthrough = 0, False, False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal answered, passthrough
            if passthrough or received <= limit:
                passthrough = passthrough or message["type"] == "http.response.start"
                await send(message)
            elif not answered:
                answered = True
                await send_error(send, too_large(limit))

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if passthrough or received <= limit:
                raise
            if not answered:
                await send_error(send, too_large(limit))


def _declared_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def send_error(send: Send, error: APIError) -> None:
    """Answer `error` in OpenAI's shape straight on the ASGI channel."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
