"""Thin routers of the admin API under /admin/v1: uploads, tasks, versions, rollback, jobs, warm."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from server.api.auth_deps import admin_principal
from server.api.context import ServerContext, context_of
from server.api.errors import (
    MAPPED_ERRORS,
    APIError,
    bad_request,
    from_engine,
    not_found,
    not_ready,
    registry_unavailable,
)
from server.api.uploads import receive_adapter, receive_checkpoint, receive_raw
from server.files import owned_name
from server.jobs import JobsClosedError, JobSpec
from server.registry import (
    InvalidTaskNameError,
    RegistryUnavailableError,
    TaskEntry,
    TaskMissingError,
    validate_task_name,
)

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(admin_principal)])
_T = TypeVar("_T")
Method = Literal["impart", "dare", "lowrank", "impart-qt", "dare-qt"]
AdapterMethod = Literal["impart", "lowrank"]
MAX_RATIO = 1e6
"""Past a matrix's size a ratio keeps nothing; the bound refuses inf and absurd values with a 400."""
MAX_SEED = 2**63 - 1
"""The mask seed is a signed 64-bit integer."""


class RollbackRequest(BaseModel):
    version: int = Field(ge=1)


@router.post("/tasks/{task:path}/checkpoint", status_code=202)
async def upload_checkpoint(
    task: str,
    request: Request,
    method: Method | None = None,
    ratio: float | None = Query(None, gt=1.0, le=MAX_RATIO),
    seed: int = Query(0, ge=0, le=MAX_SEED),
) -> JSONResponse:
    """Stream a fine-tuned checkpoint (multipart: config.json + *.safetensors) and queue its compression."""
    ctx, task = context_of(request), _task_name(task)
    await _registry(ctx.registry.ensure_reachable)  # refuse now, not after the upload and the compression
    folder = _upload_path(ctx)
    folder.mkdir(parents=True)
    try:
        await receive_checkpoint(
            request.headers.get("content-type"), request.stream(), folder, ctx.settings.max_upload_bytes
        )
        await asyncio.to_thread(_check_checkpoint, ctx.base_dir, folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    spec = JobSpec(
        task=task,
        checkpoint_dir=folder,
        method=method or ctx.settings.default_method,
        ratio=ratio or ctx.settings.default_ratio,
        seed=seed,
    )
    try:
        job = ctx.jobs.submit(spec)
    except JobsClosedError:
        shutil.rmtree(folder, ignore_errors=True)
        raise not_ready("The server is shutting down; send the upload again (another replica takes it).") from None
    return JSONResponse(job.to_dict(), status_code=202, headers={"Location": f"/admin/v1/jobs/{job.id}"})


@router.post("/tasks/{task:path}/adapter", status_code=201)
async def upload_adapter(
    task: str,
    request: Request,
    ratio: float | None = Query(None, gt=1.0, le=MAX_RATIO),
    method: AdapterMethod = "impart",
    seed: int = Query(0, ge=0, le=MAX_SEED),
) -> JSONResponse:
    """Publish a PEFT LoRA adapter (multipart: adapter_config.json + adapter_model.safetensors) as the task's
    new version, its factors stored exactly (method lora); `ratio` compresses its delta instead."""
    ctx, task = context_of(request), _task_name(task)
    await _registry(ctx.registry.ensure_reachable)
    folder = _upload_path(ctx)
    folder.mkdir(parents=True)
    try:
        await receive_adapter(
            request.headers.get("content-type"), request.stream(), folder, ctx.settings.max_upload_bytes
        )
        path = folder / "artifact.safetensors"
        await asyncio.to_thread(_import_adapter, ctx.base_dir, folder, path, ratio, method, seed)
        published = await _registry(_publish_artifact, ctx, task, path, "adapter")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return JSONResponse(_version_dict(published), status_code=201)


@router.put("/tasks/{task:path}/artifact", status_code=201)
async def upload_artifact(task: str, request: Request) -> JSONResponse:
    """Publish a ready artifact (the raw bytes of a compressor output) as the task's new version."""
    ctx, task = context_of(request), _task_name(task)
    await _registry(ctx.registry.ensure_reachable)
    path = _upload_path(ctx).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        await receive_raw(request.stream(), path, ctx.settings.max_upload_bytes)
        published = await _registry(_publish_artifact, ctx, task, path)
    finally:
        path.unlink(missing_ok=True)
    return JSONResponse(_version_dict(published), status_code=201)


@router.get("/tasks/{task:path}/artifact")
async def download_artifact(task: str, request: Request, version: int | None = Query(None, ge=1)) -> Response:
    """The artifact bytes of the task's current version (or of `version`), sha256-checked."""
    ctx = context_of(request)
    entry = await _entry(ctx, task)
    chosen = [v for v in entry.versions if v.version == (version or entry.current)]
    if not chosen:
        raise not_found(f"task {task!r} has no version {version}")
    data = await _registry(ctx.registry.read, chosen[0])
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"X-Artifact-Sha256": chosen[0].sha256, "X-Task-Version": str(chosen[0].version)},
    )


@router.get("/tasks")
async def list_tasks(request: Request) -> dict[str, Any]:
    ctx = context_of(request)
    entries = await _registry(ctx.registry.entries)
    updating = await asyncio.to_thread(ctx.jobs.active_tasks)
    return {"object": "list", "data": [_entry_dict(entry, updating) for entry in entries]}


@router.get("/tasks/{task:path}/versions")
async def list_versions(task: str, request: Request) -> dict[str, Any]:
    entry = await _entry(context_of(request), task)
    return {"object": "list", "current": entry.current, "data": [_version_dict(v) for v in entry.versions]}


@router.post("/tasks/{task:path}/rollback")
async def rollback(task: str, body: RollbackRequest, request: Request) -> dict[str, Any]:
    ctx, task = context_of(request), _task_name(task)
    try:
        version = await _registry(ctx.registry.rollback, task, body.version)
    except TaskMissingError as exc:
        raise not_found(str(exc)) from None
    return _version_dict(version)


@router.post("/tasks/{task:path}/warm")
async def warm(task: str, request: Request) -> dict[str, Any]:
    """Make the task's delta resident now, so its first request does not pay the load."""
    ctx, task = context_of(request), _task_name(task)
    try:
        await ctx.engine.prefetch(task)
    except MAPPED_ERRORS as exc:
        raise from_engine(exc, task) from None
    return {"task": task, "resident": True}


@router.delete("/tasks/{task:path}")
async def delete_task(task: str, request: Request) -> dict[str, Any]:
    ctx, task = context_of(request), _task_name(task)
    try:
        removed = await _registry(ctx.registry.delete, task)
    except TaskMissingError as exc:
        raise not_found(str(exc)) from None
    return {"task": task, "deleted": True, "versions": len(removed.versions)}


@router.get("/tasks/{task:path}")
async def get_task(task: str, request: Request) -> dict[str, Any]:
    ctx = context_of(request)
    entry = await _entry(ctx, task)
    return _entry_dict(entry, await asyncio.to_thread(ctx.jobs.active_tasks))


@router.get("/jobs")
async def list_jobs(request: Request) -> dict[str, Any]:
    jobs = await asyncio.to_thread(context_of(request).jobs.list)  # shared records: a store read
    return {"object": "list", "data": [job.to_dict() for job in jobs]}


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> dict[str, Any]:
    job = await asyncio.to_thread(context_of(request).jobs.get, job_id)
    if job is None:
        raise not_found(f"no job {job_id!r}")
    return job.to_dict()


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The engine's counters (queue, KV blocks, delta cache) as JSON."""
    from dataclasses import asdict

    return asdict(context_of(request).engine.stats())


async def _registry(call: Callable[..., _T], *args: Any) -> _T:
    """A registry call off the event loop; 503 registry_unavailable when the registry cannot be reached
    (listings answer from the last known index instead, and fail only when none was ever read)."""
    try:
        return await asyncio.to_thread(call, *args)
    except RegistryUnavailableError:
        raise registry_unavailable() from None


def _task_name(task: str) -> str:
    try:
        return validate_task_name(task)
    except InvalidTaskNameError as exc:
        raise bad_request(str(exc), "task") from None


async def _entry(ctx: ServerContext, task: str) -> TaskEntry:
    entry = await _registry(ctx.registry.entry, _task_name(task))
    if entry is None:
        raise not_found(f"no task named {task!r}")
    return entry


def _upload_path(ctx: ServerContext) -> Path:
    return ctx.settings.resolved(ctx.settings.work_dir) / "uploads" / owned_name(uuid.uuid4().hex)


def _check_checkpoint(base_dir: Path, folder: Path) -> None:
    import compressor

    try:
        compressor.check_compatible(base_dir, folder)
    except ValueError as exc:
        raise bad_request(f"The checkpoint cannot be used: {exc}", "file") from None


def _import_adapter(base_dir: Path, folder: Path, out: Path, ratio: float | None, method: str, seed: int) -> None:
    """The uploaded adapter as an artifact at `out`; 400 naming the field when it cannot serve on this base."""
    from compressor.errors import AdapterError, IncompatibleCheckpointError
    from compressor.lora import import_lora

    try:
        import_lora(folder, base_dir, out, ratio=ratio, method=method, seed=seed)
    except AdapterError as exc:
        raise bad_request(f"The adapter cannot be used: {exc}", exc.field) from None
    except IncompatibleCheckpointError as exc:
        raise bad_request(f"The adapter cannot be used: {exc}", "adapter_model.safetensors") from None


def _publish_artifact(ctx: ServerContext, task: str, path: Path, origin: str = "artifact") -> Any:
    """Decode the artifact in full against the base (compressor.verify_artifact), then publish it."""
    import compressor

    try:
        artifact = compressor.verify_artifact(path, ctx.base_dir)
    except compressor.ArtifactError as exc:
        raise APIError(
            400, f"The artifact cannot be served on this base: {exc}", param="file", code="invalid_artifact"
        ) from None
    manifest = artifact.manifest
    ratio = manifest.get("ratio", manifest.get("params", {}).get("ratio"))
    return ctx.registry.publish(
        task, path, method=artifact.method, ratio=ratio, origin=origin, quality=manifest.get("quality") or {}
    )


def _version_dict(version: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(version)


def _entry_dict(entry: TaskEntry, updating: set[str]) -> dict[str, Any]:
    """A task as the admin API shows it; status `updating` while a job for it (on any replica) is
    queued or running."""
    current = entry.current_version
    status = "updating" if entry.task in updating else "ready"
    return {
        "task": entry.task,
        "current": entry.current,
        "status": status,
        "method": current.method,
        "ratio": current.ratio,
        "sha256": current.sha256,
        "size": current.size,
        "created": current.created,
        "quality": current.quality,
        "versions": [_version_dict(v) for v in entry.versions],
    }
