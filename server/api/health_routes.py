"""Thin routers of the operator endpoints: /health (alive), /ready (serving), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from server.api.auth_deps import admin_principal
from server.api.context import ServerContext, context_of
from server.observability.metrics import CONTENT_TYPE

router = APIRouter()


class Health(BaseModel):
    """/health: the process answers."""

    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """/ready: `ready` with the base's name (200), else `loading` or `draining` (503, no base)."""

    status: Literal["ready", "loading", "draining"]
    base: str | None = None


@router.get("/health")
async def health() -> Health:
    """Liveness: 200 while the process answers at all."""
    return Health()


@router.get("/ready", response_model=Readiness, response_model_exclude_none=True)
async def ready(request: Request) -> JSONResponse | Readiness:
    """Readiness: 200 once the engine serves, 503 while it loads or the server drains."""
    ctx = context_of(request)
    if ctx.draining or not ctx.engine.ready:
        status = Readiness(status="draining" if ctx.draining else "loading")
        return JSONResponse(status.model_dump(exclude_none=True), status_code=503)
    return Readiness(status="ready", base=ctx.engine.base_name)


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """The app's Prometheus metrics (text format); an admin key when DELTASERVE_METRICS_ACCESS asks."""
    ctx = context_of(request)
    if _metrics_need_admin(ctx):
        admin_principal(request)
    return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)


def _metrics_need_admin(ctx: ServerContext) -> bool:
    """DELTASERVE_METRICS_ACCESS: `admin`, or `auto` with any key configured, needs an admin key."""
    access = ctx.settings.metrics_access
    return access == "admin" or (access == "auto" and not ctx.keys.open)
