"""Thin routers of the admin API under /admin/v1: uploads, tasks, versions, rollback, jobs, warm."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, Field

import compressor
from server.api.auth_deps import admin_principal
from server.api.context import ServerContext, context_of
from server.api.errors import MAPPED_ERRORS, APIError, bad_request, from_engine, not_found, not_ready
from server.api.protocol import INT64_MAX
from server.api.uploads import receive_adapter, receive_checkpoint, receive_raw
from server.config import check_method
from server.engine.types import EngineStats
from server.files import owned_name
from server.jobs import Job, JobsClosedError, JobSpec
from server.registry import TaskEntry, TaskVersion, validate_task_name

router = APIRouter(prefix="/admin/v1", dependencies=[Depends(admin_principal)])
"""Every route needs an admin key; registry errors a route lets through are the app's handler's
(server.api.errors.from_registry)."""
Method = Annotated[str, AfterValidator(lambda method: check_method(method, compressor.METHODS))]
"""A checkpoint's compression method: one of compressor.METHODS (400 naming `method` otherwise)."""
AdapterMethod = Annotated[str, AfterValidator(lambda method: check_method(method, compressor.ADAPTER_METHODS))]
"""The method that compresses an adapter's delta: one of compressor.ADAPTER_METHODS."""
MAX_RATIO = 1e6
"""Past a matrix's size a ratio keeps nothing; the bound refuses inf and absurd values with a 400."""
Ratio = Annotated[float | None, Query(gt=1.0, le=MAX_RATIO)]
"""An upload's compression ratio: in (1, MAX_RATIO]; None for the default (or no compression)."""
Seed = Annotated[int, Query(ge=0, le=INT64_MAX)]
"""The mask seed: a non-negative signed 64-bit integer."""


class RollbackRequest(BaseModel):
    """Body of a rollback: the version to make current again."""

    version: int = Field(ge=1)


class TaskView(BaseModel):
    """A task as the admin API shows it: its current version's fields, and `updating` while a job for it
    (on any replica) is queued or running."""

    task: str
    current: int
    status: Literal["ready", "updating"]
    method: str
    ratio: float | None
    sha256: str
    size: int
    created: float
    quality: dict[str, Any]
    versions: list[TaskVersion]


class TaskList(BaseModel):
    """GET /tasks."""

    object: Literal["list"] = "list"
    data: list[TaskView]


class VersionList(BaseModel):
    """GET /tasks/{task}/versions: every kept version, oldest first, and the current one's number."""

    object: Literal["list"] = "list"
    current: int
    data: list[TaskVersion]


class JobList(BaseModel):
    """GET /jobs: the compression jobs every replica recorded."""

    object: Literal["list"] = "list"
    data: list[Job]


class Warmed(BaseModel):
    """POST /tasks/{task}/warm: the task's delta is resident."""

    task: str
    resident: bool


class Deleted(BaseModel):
    """DELETE /tasks/{task}: the task and how many versions it had."""

    task: str
    deleted: bool
    versions: int


@router.post("/tasks/{task:path}/checkpoint", status_code=202)
async def upload_checkpoint(
    task: str,
    request: Request,
    response: Response,
    method: Method | None = None,
    ratio: Ratio = None,
    seed: Seed = 0,
) -> Job:
    """Stream a fine-tuned checkpoint (multipart: config.json + *.safetensors) and queue its compression."""
    ctx, task = context_of(request), validate_task_name(task)
    await asyncio.to_thread(ctx.registry.ensure_reachable)  # refuse now, not after the upload and compression
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
    response.headers["Location"] = f"/admin/v1/jobs/{job.id}"
    return job


@router.post("/tasks/{task:path}/adapter", status_code=201)
async def upload_adapter(
    task: str,
    request: Request,
    ratio: Ratio = None,
    method: AdapterMethod = "impart",
    seed: Seed = 0,
) -> TaskVersion:
    """Publish a PEFT LoRA adapter (multipart: adapter_config.json + adapter_model.safetensors) as the task's
    new version, its factors stored exactly (method lora); `ratio` compresses its delta instead."""
    ctx, task = context_of(request), validate_task_name(task)
    await asyncio.to_thread(ctx.registry.ensure_reachable)
    folder = _upload_path(ctx)
    folder.mkdir(parents=True)
    try:
        await receive_adapter(
            request.headers.get("content-type"), request.stream(), folder, ctx.settings.max_upload_bytes
        )
        path = folder / "artifact.safetensors"
        await asyncio.to_thread(_import_adapter, ctx.base_dir, folder, path, ratio, method, seed)
        return await asyncio.to_thread(_publish_artifact, ctx, task, path, "adapter")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@router.put("/tasks/{task:path}/artifact", status_code=201)
async def upload_artifact(task: str, request: Request) -> TaskVersion:
    """Publish a ready artifact (the raw bytes of a compressor output) as the task's new version."""
    ctx, task = context_of(request), validate_task_name(task)
    await asyncio.to_thread(ctx.registry.ensure_reachable)
    path = _upload_path(ctx).with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        await receive_raw(request.stream(), path, ctx.settings.max_upload_bytes)
        return await asyncio.to_thread(_publish_artifact, ctx, task, path)
    finally:
        path.unlink(missing_ok=True)


@router.get("/tasks/{task:path}/artifact", response_class=Response)
async def download_artifact(task: str, request: Request, version: int | None = Query(None, ge=1)) -> Response:
    """The artifact bytes of the task's current version (or of `version`), sha256-checked."""
    ctx = context_of(request)
    entry = await _entry(ctx, task)
    chosen = [v for v in entry.versions if v.version == (version or entry.current)]
    if not chosen:
        raise not_found(f"task {task!r} has no version {version}")
    data = await asyncio.to_thread(ctx.registry.read, chosen[0])
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"X-Artifact-Sha256": chosen[0].sha256, "X-Task-Version": str(chosen[0].version)},
    )


@router.get("/tasks")
async def list_tasks(request: Request) -> TaskList:
    """Every published task (listings answer from the last known index while the registry is away)."""
    ctx = context_of(request)
    entries = await asyncio.to_thread(ctx.registry.entries)
    updating = await asyncio.to_thread(ctx.jobs.active_tasks)
    return TaskList(data=[_task_view(entry, updating) for entry in entries])


@router.get("/tasks/{task:path}/versions")
async def list_versions(task: str, request: Request) -> VersionList:
    """The task's kept versions and which one is current."""
    entry = await _entry(context_of(request), task)
    return VersionList(current=entry.current, data=list(entry.versions))


@router.post("/tasks/{task:path}/rollback")
async def rollback(task: str, body: RollbackRequest, request: Request) -> TaskVersion:
    """Make a kept version current again (404 when the task or the version is missing)."""
    ctx, task = context_of(request), validate_task_name(task)
    return await asyncio.to_thread(ctx.registry.rollback, task, body.version)


@router.post("/tasks/{task:path}/warm")
async def warm(task: str, request: Request) -> Warmed:
    """Make the task's delta resident now, so its first request does not pay the load."""
    ctx, task = context_of(request), validate_task_name(task)
    try:
        await ctx.engine.prefetch(task)
    except MAPPED_ERRORS as exc:
        raise from_engine(exc, task) from None
    return Warmed(task=task, resident=True)


@router.delete("/tasks/{task:path}")
async def delete_task(task: str, request: Request) -> Deleted:
    """Unpublish the task and every version of it (404 when there is none)."""
    ctx, task = context_of(request), validate_task_name(task)
    removed = await asyncio.to_thread(ctx.registry.delete, task)
    return Deleted(task=task, deleted=True, versions=len(removed.versions))


@router.get("/tasks/{task:path}")
async def get_task(task: str, request: Request) -> TaskView:
    """One task as `list_tasks` shows it."""
    ctx = context_of(request)
    entry = await _entry(ctx, task)
    return _task_view(entry, await asyncio.to_thread(ctx.jobs.active_tasks))


@router.get("/jobs")
async def list_jobs(request: Request) -> JobList:
    """Every recorded compression job (shared records: a store read)."""
    jobs = await asyncio.to_thread(context_of(request).jobs.list)
    return JobList(data=jobs)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request) -> Job:
    """One compression job's progress and outcome."""
    job = await asyncio.to_thread(context_of(request).jobs.get, job_id)
    if job is None:
        raise not_found(f"no job {job_id!r}")
    return job


@router.get("/stats")
async def stats(request: Request) -> EngineStats:
    """The engine's counters (queue, KV blocks, delta cache) as JSON."""
    return context_of(request).engine.stats()


async def _entry(ctx: ServerContext, task: str) -> TaskEntry:
    entry = await asyncio.to_thread(ctx.registry.entry, validate_task_name(task))
    if entry is None:
        raise not_found(f"no task named {task!r}")
    return entry


def _upload_path(ctx: ServerContext) -> Path:
    return ctx.settings.resolved(ctx.settings.work_dir) / "uploads" / owned_name(uuid.uuid4().hex)


def _check_checkpoint(base_dir: Path, folder: Path) -> None:
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


def _publish_artifact(ctx: ServerContext, task: str, path: Path, origin: str = "artifact") -> TaskVersion:
    """Decode the artifact in full against the base (compressor.verify_artifact), then publish it."""
    try:
        artifact = compressor.verify_artifact(path, ctx.base_dir)
    except compressor.ArtifactError as exc:
        raise APIError(
            400, f"The artifact cannot be served on this base: {exc}", param="file", code="invalid_artifact"
        ) from None
    manifest = artifact.manifest
    params, quality = manifest.get("params"), manifest.get("quality")
    ratio = manifest.get("ratio", params.get("ratio") if isinstance(params, dict) else None)
    return ctx.registry.publish(
        task,
        path,
        method=artifact.method,
        ratio=ratio if isinstance(ratio, (int, float)) else None,
        origin=origin,
        quality=quality if isinstance(quality, dict) else {},
    )


def _task_view(entry: TaskEntry, updating: set[str]) -> TaskView:
    """A task as the admin API shows it; status `updating` while a job for it is queued or running."""
    current = entry.current_version
    return TaskView(
        task=entry.task,
        current=entry.current,
        status="updating" if entry.task in updating else "ready",
        method=current.method,
        ratio=current.ratio,
        sha256=current.sha256,
        size=current.size,
        created=current.created,
        quality=current.quality,
        versions=list(entry.versions),
    )
