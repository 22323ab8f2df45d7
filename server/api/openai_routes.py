"""Thin routers of the OpenAI-compatible API: parse, authorize, hand to the serving layer, respond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from server.api.auth_deps import api_principal
from server.api.context import ServerContext, context_of
from server.api.errors import not_ready
from server.api.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, new_id
from server.api.serving import Target, resolve_target
from server.auth import Principal

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, principal: Principal = Depends(api_principal)
) -> Response:
    """POST /v1/chat/completions: one chat request, collected or streamed as SSE."""
    ctx = context_of(request)
    target = await _target(ctx, request, body.model, principal)
    return _respond(await ctx.chat.create(body, target, new_id("chatcmpl")))


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, principal: Principal = Depends(api_principal)
) -> Response:
    """POST /v1/completions: one prompt, collected or streamed as SSE."""
    ctx = context_of(request)
    target = await _target(ctx, request, body.model, principal)
    return _respond(await ctx.completion.create(body, target, new_id("cmpl")))


@router.get("/v1/models")
async def list_models(request: Request, principal: Principal = Depends(api_principal)) -> ModelList:
    """GET /v1/models: the base and the tasks this key may use."""
    ctx = context_of(request)
    base = ctx.engine.base_name
    cards = [ModelCard(id=base, created=int(ctx.started), owned_by="deltaserve")]
    refs = await asyncio.to_thread(ctx.registry.tasks)  # the last known index while Redis is away
    cards += [
        ModelCard(id=ref.task, created=int(ref.created), owned_by="deltaserve", root=base, parent=base)
        for ref in refs
        if principal.may_use(ref.task)
    ]
    return ModelList(data=cards)


async def _target(ctx: ServerContext, request: Request, model: str, principal: Principal) -> Target:
    if ctx.draining or not ctx.engine.ready:
        raise not_ready()
    return await asyncio.to_thread(
        resolve_target, request.headers.get("x-task"), model, ctx.engine.base_name, principal, ctx.registry
    )


def _respond(result: BaseModel | AsyncIterator[str]) -> Response:
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump(mode="json"))
    return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)
