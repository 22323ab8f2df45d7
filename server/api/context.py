"""What the routers share: one object on `app.state.deltaserve`, built by `server.app.create_app`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import cast

from fastapi import Request

from server.api.serving import EngineClient
from server.api.serving_chat import ChatServing
from server.api.serving_completion import CompletionServing
from server.auth import KeyRing
from server.config import Settings
from server.jobs import JobManager
from server.observability.metrics import Metrics
from server.registry import Registry


@dataclass
class ServerContext:
    """The app's long-lived objects and its draining flag."""

    settings: Settings
    keys: KeyRing
    registry: Registry
    engine: EngineClient
    """The Engine (contract D), as far as the HTTP layer uses it."""
    metrics: Metrics
    jobs: JobManager
    base_dir: Path
    chat: ChatServing
    completion: CompletionServing
    started: float
    draining: bool = False
    """Set at shutdown: new generation requests get 503 while in-flight ones finish."""


def context_of(request: Request) -> ServerContext:
    """The ServerContext `create_app` put on the app's state."""
    # starlette's State holds untyped attributes; create_app sets this one to a ServerContext
    return cast(ServerContext, request.app.state.deltaserve)
