"""The FastAPI application and `run_server`: the HTTP edge of deltaserve.

`create_app` wires the registry, the engine, the job manager, keys and metrics into one
ServerContext, mounts the OpenAI, admin and health routers and answers every known error in OpenAI's
shape; `run_server` runs it under uvicorn with a
graceful shutdown: stop admitting, let in-flight streams finish within DELTASERVE_SHUTDOWN_TIMEOUT,
then abort the rest (their last chunk says finish_reason "abort").
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.api import admin_routes, health_routes, openai_routes
from server.api.context import ServerContext
from server.api.errors import APIError, bad_request, from_registry, unsupported_parameter
from server.api.middleware import BodyLimitMiddleware, RequestContextMiddleware
from server.api.serving import EngineClient, RequestLimits
from server.api.serving_chat import ChatServing
from server.api.serving_completion import CompletionServing
from server.auth import KeyRing
from server.config import Settings, get_settings
from server.jobs import JobManager
from server.jobs.jobs import collect_leftovers
from server.observability.metrics import Metrics
from server.registry import Registry, RegistryError, RegistryUnavailableError, open_registry

log = logging.getLogger("deltaserve")
UNION_TAG = re.compile(r"str|int|float|bool|[a-z-]+\[.*\]")
"""How pydantic names the member of a union in an error's location (`str`, `list[int]`, `function-after[...]`)."""
MAX_PARAM_CHARS = 200
NO_DETAILS = ErrorDetails(type="", loc=(), msg="invalid request", input=None)
"""What a RequestValidationError without details is answered as."""


def create_app(
    settings: Settings | None = None, *, engine: EngineClient | None = None, registry: Registry | None = None
) -> FastAPI:
    """The app; `engine` and `registry` default to the ones the settings describe."""
    settings = settings or get_settings()
    ctx = build_context(settings, engine, registry)
    app = FastAPI(title="deltaserve", lifespan=_lifespan(ctx))
    app.state.deltaserve = ctx
    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(health_routes.router)
    _add_error_handlers(app)
    upload_limit, request_limit = settings.max_upload_bytes, settings.max_request_bytes
    app.add_middleware(
        BodyLimitMiddleware, limit_for=lambda path: upload_limit if path.startswith("/admin/") else request_limit
    )
    app.add_middleware(RequestContextMiddleware, metrics=ctx.metrics)
    return app


def build_context(settings: Settings, engine: EngineClient | None, registry: Registry | None) -> ServerContext:
    """The ServerContext of one app: the given engine and registry, or those the settings describe."""
    registry = registry or open_registry(settings)
    engine = engine or _engine(settings, registry)
    metrics, limits = Metrics(), RequestLimits.from_settings(settings)
    jobs = JobManager(registry, engine.base_dir, settings.resolved(settings.work_dir))
    metrics.watch_engine(engine.stats)
    metrics.watch_jobs(jobs.counts)
    metrics.watch_registry(lambda: registry.view.reachable, lambda: registry.view.known_tasks)
    return ServerContext(
        settings=settings,
        keys=KeyRing.from_settings(settings),
        registry=registry,
        engine=engine,
        metrics=metrics,
        jobs=jobs,
        base_dir=engine.base_dir,
        chat=ChatServing(engine, metrics, limits),
        completion=CompletionServing(engine, metrics, limits),
        started=time.time(),
    )


def _engine(settings: Settings, registry: Registry) -> EngineClient:
    """The Engine the settings describe (imported here: it loads torch)."""
    from server.engine.engine import Engine

    return Engine(settings, registry)


def _lifespan(ctx: ServerContext) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Startup (leftovers collected, engine started, registry events forwarded) and shutdown (drain)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.keys.open:
            log.warning("no API or admin keys configured: every caller is admitted; serving on localhost only")
        await asyncio.to_thread(_collect, ctx)
        await ctx.engine.start()
        _forward_registry_changes(ctx, asyncio.get_running_loop())
        known = await asyncio.to_thread(ctx.registry.view.sync)
        log.info(
            "ready: base %s, registry %s, %s",
            ctx.engine.base_name,
            ctx.settings.registry,
            f"{len(ctx.registry.view.entries())} tasks" if known else "unreachable for now (retrying)",
        )
        yield
        await drain(ctx)
        ctx.jobs.shutdown()
        ctx.registry.close()

    return lifespan


async def drain(ctx: ServerContext) -> None:
    """Stop admitting; in-flight requests get the shutdown timeout, then the engine aborts them."""
    if ctx.draining:
        return
    ctx.draining = True
    await asyncio.to_thread(ctx.jobs.shutdown)  # jobs are recorded failed now, not when the drain ends
    log.info("shutting down: draining in-flight requests for up to %.0fs", ctx.settings.shutdown_timeout)
    await ctx.engine.stop(timeout=ctx.settings.shutdown_timeout)


def _collect(ctx: ServerContext) -> None:
    """Remove leftovers of dead processes; a registry that cannot be reached is skipped (the server
    starts anyway and serves the base until the registry answers)."""
    try:
        ctx.registry.collect_garbage()
    except RegistryUnavailableError as exc:
        log.warning("registry garbage collection skipped: %s", exc)
    collect_leftovers(ctx.settings.resolved(ctx.settings.work_dir))


def _forward_registry_changes(ctx: ServerContext, loop: asyncio.AbstractEventLoop) -> None:
    """A task published, rolled back or deleted (here or by another replica): retire its resident
    versions other than the current one. This only frees memory early; requests carry the version they
    resolved, so a stale delta is never served even if this notice is late or lost. Also starts the
    registry's view (events and periodic resync)."""

    def changed(task: str) -> None:
        current = ctx.registry.view.known(task)
        log.info("registry changed task %s (now %s)", task, f"version {current.version}" if current else "gone")
        loop.call_soon_threadsafe(ctx.engine.invalidate, task, current.sha256 if current else None)

    ctx.registry.subscribe(changed)


def _add_error_handlers(app: FastAPI) -> None:
    """Known errors in OpenAI's shape; anything unexpected is RequestContextMiddleware's 500."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _answer(exc)

    @app.exception_handler(RegistryError)
    async def registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return _answer(from_registry(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors: list[ErrorDetails] = list(exc.errors()) or [NO_DETAILS]
        # the deepest complaint: of a union's members, the one the value came closest to matching
        return _answer(_validation_error(max(errors, key=lambda e: len(e.get("loc", ())))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(
            exc.status_code,
            str(exc.detail),
            type="invalid_request_error" if exc.status_code < 500 else "server_error",
            code="not_found" if exc.status_code == 404 else None,
        )
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def _answer(error: APIError) -> JSONResponse:
    """The JSON response of an APIError: its status, body and headers."""
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _validation_error(first: ErrorDetails) -> APIError:
    """The 400 of one of pydantic's complaints: `unsupported_parameter` for an unknown field, else the
    parameter's path (`messages.0.content`) with pydantic's message."""
    if first["type"] == "json_invalid":
        return bad_request(f"The body is not valid JSON: {first.get('ctx', {}).get('error', 'decode error')}.")
    param = _param_of(first.get("loc", ()))
    if first["type"] == "extra_forbidden" and param:
        return unsupported_parameter(param)
    return APIError(400, f"{param}: {first['msg']}" if param else str(first["msg"]), param=param, code="invalid_value")


def _param_of(loc: Sequence[str | int]) -> str | None:
    """`messages.0.content` from pydantic's location, without the body/query prefix and union tags."""
    parts = [str(part) for part in loc if part not in ("body", "query", "path", "header")]
    parts = [part for part in parts if not UNION_TAG.fullmatch(part)]
    return ".".join(parts)[:MAX_PARAM_CHARS] or None


def run_server(host: str | None = None, port: int | None = None) -> int:
    """Serve the app the settings describe under uvicorn until a signal; drains at shutdown."""
    from server.observability.logging import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    app = create_app(settings)
    host = _safe_host(host or settings.host, app.state.deltaserve.keys)
    config = uvicorn.Config(
        app,
        host=host,
        port=port or settings.port,
        log_level=settings.log_level,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 5,
    )
    _DrainingServer(config, app.state.deltaserve).run()
    return 0


def _safe_host(host: str, keys: KeyRing) -> str:
    """With no keys configured, refuse to listen beyond the loopback interface."""
    if not keys.open or _is_loopback(host):
        return host
    log.warning(
        "no keys configured (DELTASERVE_ADMIN_KEYS / DELTASERVE_API_KEYS): binding to 127.0.0.1 instead of %s", host
    )
    return "127.0.0.1"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _DrainingServer(uvicorn.Server):
    """uvicorn's Server whose shutdown drains the engine while uvicorn waits for open connections."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        draining = asyncio.create_task(drain(self.ctx))
        await super().shutdown(sockets=sockets)
        await draining
