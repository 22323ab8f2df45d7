"""Errors in OpenAI's shape {"error": {"message", "type", "param", "code"}}; no FastAPI in here.

The one mapping of the inside's errors to HTTP: `from_engine` for the engine's, `from_registry` for the
registry's (the app's exception handler answers every RegistryError a route lets through with it).
A 500 never carries internal text: `internal_error` names the request id (the X-Request-ID header)
so an operator finds the traceback in the log, and says nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from server.engine.types import (
    DeltaLoadError,
    EngineError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    TaskNotFoundError,
)
from server.observability.logging import request_id_var
from server.registry import InvalidTaskNameError, RegistryError, RegistryUnavailableError, TaskMissingError

log = logging.getLogger("deltaserve.errors")

RETRY_AFTER_S = 1


@dataclass
class APIError(Exception):
    """An HTTP error answer: its status, OpenAI's error fields and extra headers (Retry-After, ...)."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, dict[str, str | None]]:
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        param = _valid_unicode(self.param) if self.param is not None else None
        return {
            "error": {"message": _valid_unicode(self.message), "type": self.type, "param": param, "code": self.code}
        }

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def _valid_unicode(text: str) -> str:
    """`text` with lone surrogates (echoed from a bad request) written as `\\udXXX` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_request(message: str, param: str | None = None) -> APIError:
    """400 invalid_request_error; code `invalid_value` when it names the parameter."""
    return APIError(400, message, param=param, code="invalid_value" if param else None)


def unsupported_parameter(param: str) -> APIError:
    """400 `unsupported_parameter`: a field this server does not honour."""
    return APIError(
        400,
        f"`{param}` is not supported by this server; remove it from the request.",
        param=param,
        code="unsupported_parameter",
    )


def internal_error() -> APIError:
    """The 500 of anything unexpected: no internal text, only the request id to find it in the log."""
    return APIError(
        500,
        f"Internal server error (request id {request_id_var.get() or 'unknown'}).",
        type="server_error",
        code="internal_error",
    )


def model_not_found(model: str) -> APIError:
    """404 `model_not_found` naming `model` (an unknown task, or one the key may not see)."""
    return APIError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def not_found(message: str) -> APIError:
    """404 `not_found` of the admin API (a task, version or job)."""
    return APIError(404, message, type="not_found_error", code="not_found")


def unauthorized(message: str = "Missing or invalid API key; send `Authorization: Bearer <key>`.") -> APIError:
    """401 `invalid_api_key` with WWW-Authenticate."""
    return APIError(
        401, message, type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
    )


def forbidden(message: str) -> APIError:
    """403 `forbidden`: the key is known but may not do this."""
    return APIError(403, message, type="permission_error", code="forbidden")


def too_large(limit: int) -> APIError:
    """413 `request_too_large`: the body exceeds `limit` bytes."""
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


def not_ready(message: str = "The server is starting or shutting down; retry shortly.") -> APIError:
    """503 `not_ready` with Retry-After."""
    return APIError(
        503, message, type="service_unavailable", code="not_ready", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def registry_unavailable() -> APIError:
    """The registry cannot be reached and the answer is not in its last known index: transient (the
    cause is in the server's log, not in the reply)."""
    return APIError(
        503,
        "The task registry cannot be reached right now; retry shortly.",
        type="service_unavailable",
        code="registry_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


MAPPED_ERRORS = (EngineError, RegistryUnavailableError)
"""What the engine's calls raise that `from_engine` maps to an HTTP error (the registry's unavailability
reaches the HTTP layer through the engine's task lookups)."""


def from_engine(exc: EngineError | RegistryUnavailableError, model: str) -> APIError:
    """The HTTP error an engine error maps to."""
    if isinstance(exc, TaskNotFoundError):
        return model_not_found(model)
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is at capacity: {exc}",
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, EngineNotReadyError):
        return not_ready(str(exc) or "The engine is not ready.")
    if isinstance(exc, InvalidRequestError):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, RegistryError):
        return from_registry(exc)
    if isinstance(exc, DeltaLoadError):
        # published but unusable here (corrupt blob, wrong base, larger than the delta cache): not the
        # caller's fault and not transient, so 503 without Retry-After, naming the cause for operators
        return APIError(
            503,
            f"The model `{model}` is published but cannot be served: {exc}",
            type="service_unavailable",
            param="model",
            code="task_unavailable",
        )
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc) or "The request failed.", type="server_error", code="request_failed")
    log.error("unexpected engine error", exc_info=exc)
    return internal_error()


def from_registry(exc: RegistryError) -> APIError:
    """The HTTP error a registry error maps to: unreachable 503 (Retry-After), an invalid task name 400
    naming `task`, a missing task or version 404; anything else is logged and answered 500."""
    if isinstance(exc, RegistryUnavailableError):
        return registry_unavailable()
    if isinstance(exc, InvalidTaskNameError):
        return bad_request(str(exc), "task")
    if isinstance(exc, TaskMissingError):
        return not_found(str(exc))
    log.error("unexpected registry error", exc_info=exc)
    return internal_error()
