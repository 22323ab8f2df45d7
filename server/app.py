"""The FastAPI application and `run_server`: the HTTP edge of deltaserve.

For now: /health (live), /ready (base model found and loaded) and /v1/models (the base). The server
issue adds the OpenAI endpoints, admin API and metrics on top of this app factory.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from server.config import Settings, get_settings
from server.model.config import ModelConfig
from server.model.provision import resolve_base_model

log = logging.getLogger("deltaserve")


@dataclass
class AppState:
    settings: Settings
    base_name: str
    base_dir: Path | None = None
    base_config: ModelConfig | None = None
    started: float = 0.0


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState(settings=settings, base_name=_base_name(settings.base_model), started=time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.base_dir = resolve_base_model(settings.base_model, settings.resolved(settings.model_cache))
        state.base_config = ModelConfig.from_dir(state.base_dir)
        log.info("base model %s loaded from %s", state.base_name, state.base_dir)
        yield

    app = FastAPI(title="deltaserve", lifespan=lifespan)
    app.state.deltaserve = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.base_config is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready", "base": state.base_name})

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {"object": "list", "data": [_model_card(state.base_name, int(state.started))]}

    return app


def _base_name(base_model: str) -> str:
    return Path(base_model).name or base_model


def _model_card(model_id: str, created: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "deltaserve"}


def run_server(host: str | None = None, port: int | None = None) -> int:
    import uvicorn

    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                log_level=settings.log_level)
    return 0
