"""Compression jobs: an uploaded checkpoint -> check against the base -> compress -> verify -> publish.

Jobs run one at a time, off the request path: a thread of the server orchestrates each job, and the
compression itself runs in a worker process (worker.py says why), started with the first job and
kept. A job publishes only after the artifact it made decodes in full against the base
(compressor.verify_artifact); on any failure nothing is published, the job records a clear error, and
its upload and scratch files are removed either way. At shutdown queued jobs are recorded cancelled and
running ones interrupted at once (files removed), and the worker is stopped.

Every change of a job is also written to the registry (Registry.put_job), so any replica sharing
the registry answers for any job (behind the gateway, an upload and the polls of its job reach
different replicas). The owner re-writes its unfinished jobs every HEARTBEAT_S; a queued or running
record nobody wrote for STALE_S is shown failed ("lost"), since the replica holding it is gone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar, cast

from server.files import abandoned, owned_name
from server.jobs.worker import ProgressQueue, compress_checkpoint, init_worker, spawn_context
from server.registry import JobRecord, JobState, Registry, TaskVersion

log = logging.getLogger("deltaserve.jobs")
_T = TypeVar("_T")
KEPT_FINISHED_JOBS = 256
HEARTBEAT_S = 10.0
STALE_S = 60.0
SHARE_EVERY_S = 1.0
"""Progress reaches the shared record at most this often (state changes always do)."""
CANCELLED = "cancelled: the server shut down"
INTERRUPTED = "interrupted: the server shut down"


class JobInterruptedError(RuntimeError):
    """The server began shutting down before the job could publish."""


class JobsClosedError(RuntimeError):
    """A job submitted after shutdown began (the caller should answer 503: another replica takes it)."""


@dataclass(frozen=True)
class JobSpec:
    """What to compress: an uploaded checkpoint folder, the task it publishes, and how."""

    task: str
    checkpoint_dir: Path
    method: str
    ratio: float
    seed: int = 0
    params: dict[str, object] = field(default_factory=dict)
    """The method's further options (compressor.compress's keyword arguments)."""


@dataclass(frozen=True)
class Job:
    """A snapshot of one compression job; its shared record (JobRecord) has exactly these fields."""

    id: str
    task: str
    method: str
    ratio: float
    state: JobState = "queued"
    done: int = 0
    total: int = 0
    tensor: str = ""
    """The tensor being compressed now."""
    error: str | None = None
    version: int | None = None
    """The published version, once succeeded."""
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    replica: str = ""
    """The server (host:pid) running the job."""
    updated: float = field(default_factory=time.time)
    """When the replica running it last wrote this record."""

    def to_dict(self) -> JobRecord:
        """The job as its shared record (and the admin API's JSON)."""
        return cast(JobRecord, dataclasses.asdict(self))  # asdict is untyped; the fields are JobRecord's

    @classmethod
    def from_record(cls, record: JobRecord, now: float) -> Job:
        """A job read from the shared store; a queued or running one nobody updated for STALE_S is lost."""
        job = cls(**record)
        if job.state in ("queued", "running") and now - job.updated > STALE_S:
            return replace(
                job,
                state="failed",
                finished=job.updated,
                error=f"lost: replica {job.replica} stopped reporting on this job",
            )
        return job


class JobManager:
    """This replica's compression jobs, one at a time, with every job's record shared through the registry."""

    def __init__(self, registry: Registry, base_dir: Path, work_dir: Path, replica: str | None = None) -> None:
        self.registry, self.base_dir, self.work_dir = registry, base_dir, work_dir
        self.replica = replica or f"{socket.gethostname()}:{os.getpid()}"
        self._jobs: dict[str, Job] = {}
        self._shared_at: dict[str, float] = {}
        self._shared_updated: dict[str, float] = {}
        """Per job, the `updated` of the snapshot last written to the store."""
        self._share_lock = threading.Lock()
        self._specs: dict[str, JobSpec] = {}
        """Specs of jobs not finished yet (their uploads are removed when the job ends or is cancelled)."""
        self._lock = threading.Lock()
        self._publish_lock = threading.Lock()
        """Held across the last check for shutdown and the publish, so shutdown knows which jobs published."""
        self._closing = False
        """Set once by shutdown, under both locks."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        self._progress: ProgressQueue = spawn_context().Queue()
        self._worker: ProcessPoolExecutor | None = None
        threading.Thread(target=self._listen, name="compress-progress", daemon=True).start()

    def submit(self, spec: JobSpec) -> Job:
        """Queue a job for `spec`; JobsClosedError once shutdown began."""
        job = Job(
            id=f"job-{uuid.uuid4().hex[:16]}",
            task=spec.task,
            method=spec.method,
            ratio=spec.ratio,
            replica=self.replica,
        )
        with self._lock:
            if self._closing:
                raise JobsClosedError("the server is shutting down and takes no new jobs")
            self._jobs[job.id] = job
            self._specs[job.id] = spec
            self._forget_old()
            self._pool.submit(self._run, job.id, spec)
        self._share(job)
        log.info("job %s queued: compress %s with %s at ratio %g", job.id, spec.task, spec.method, spec.ratio)
        return job

    def get(self, job_id: str) -> Job | None:
        """This replica's job, else the shared record another replica wrote; None when neither knows it."""
        with self._lock:
            job = self._jobs.get(job_id)
        if job is not None:
            return job
        record = self._shared(lambda: self.registry.job(job_id))
        return None if record is None else Job.from_record(record, time.time())

    def list(self) -> list[Job]:
        """Every job this replica or another one sharing the registry keeps, oldest first."""
        with self._lock:
            jobs = dict(self._jobs)
        now = time.time()
        for record in self._shared(self.registry.jobs) or []:
            if record["id"] not in jobs:
                job = Job.from_record(record, now)
                jobs[job.id] = job
        return sorted(jobs.values(), key=lambda job: job.created)

    def counts(self) -> dict[str, int]:
        """Jobs of this replica by state (for its metrics: summing replicas must not count a job twice)."""
        counts = {state: 0 for state in ("queued", "running", "succeeded", "failed")}
        with self._lock:
            for job in self._jobs.values():
                counts[job.state] += 1
        return counts

    def active(self, task: str) -> bool:
        """A job for `task` is queued or running (on any replica)."""
        return task in self.active_tasks()

    def active_tasks(self) -> set[str]:
        """Tasks with a queued or running job on any replica (one read of the shared records)."""
        return {job.task for job in self.list() if job.state in ("queued", "running")}

    def shutdown(self, wait: bool = False) -> None:
        """Record every queued job cancelled and every running one interrupted at once (the shared record
        says so now, not when it goes stale), remove their uploads and scratch, and stop the worker;
        nothing is published after this. A job that already published keeps its success. Idempotent (the
        server calls it when the drain begins and again when the app stops)."""
        with self._publish_lock, self._lock:
            if self._closing:
                return
            self._closing = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            ended = {
                job.id: CANCELLED if job.state == "queued" else INTERRUPTED
                for job in self._jobs.values()
                if job.state == "queued" or (job.state == "running" and job.version is None)
            }
        for job_id, error in ended.items():
            self._finish(job_id, "failed", error)
            self._remove_files(job_id)
        if self._worker is not None:
            for process in list(getattr(self._worker, "_processes", {}).values()):
                process.terminate()  # the executor has no public way to stop a running call
            self._worker.shutdown(wait=wait, cancel_futures=True)
        self._pool.shutdown(wait=wait)
        self._progress.put(None)

    def _run(self, job_id: str, spec: JobSpec) -> None:
        if not self._start(job_id):
            return
        try:
            published = self._compress_and_publish(job_id, spec, self._scratch(job_id))
            state: JobState = "succeeded"  # its version was recorded as it published
            error = None
            log.info("job %s published %s version %d", job_id, spec.task, published.version)
        except Exception as exc:  # noqa: BLE001 - a job records any failure; nothing is published
            state, error = "failed", f"{type(exc).__name__}: {exc}"
            log.warning("job %s failed, nothing published: %s", job_id, error)
        finally:
            self._remove_files(job_id)
        # a job shows its end only once its files are gone
        self._finish(job_id, state, error)

    def _start(self, job_id: str) -> bool:
        """queued -> running; False when the job already ended (cancelled at shutdown)."""
        with self._lock:
            job = self._jobs[job_id]
            if job.state != "queued":
                return False
            job = self._jobs[job_id] = replace(job, state="running", started=time.time(), updated=time.time())
        self._share(job)
        return True

    def _finish(self, job_id: str, state: JobState, error: str | None) -> None:
        """Record the job's end now, unless it has one already (shutdown records it first)."""
        finished = time.time()
        with self._lock:
            job = self._jobs[job_id]
            if job.state not in ("queued", "running"):
                return
            job = self._jobs[job_id] = replace(job, state=state, error=error, finished=finished, updated=time.time())
        self._share(job)

    def _scratch(self, job_id: str) -> Path:
        return self.work_dir / "jobs" / owned_name(job_id)

    def _remove_files(self, job_id: str) -> None:
        """The job's upload and scratch folder."""
        with self._lock:
            spec = self._specs.pop(job_id, None)
        if spec is not None:
            shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
        shutil.rmtree(self._scratch(job_id), ignore_errors=True)

    def _compress_and_publish(self, job_id: str, spec: JobSpec, scratch: Path) -> TaskVersion:
        scratch.mkdir(parents=True, exist_ok=True)
        out = scratch / "artifact.safetensors"
        if self._closing:
            raise JobInterruptedError(INTERRUPTED)
        if self._worker is None:
            self._worker = ProcessPoolExecutor(
                max_workers=1, mp_context=spawn_context(), initializer=init_worker, initargs=(self._progress,)
            )
        quality, tensors = self._worker.submit(
            compress_checkpoint,
            job_id,
            self.base_dir,
            spec.checkpoint_dir,
            out,
            spec.method,
            spec.ratio,
            spec.seed,
            spec.params,
        ).result()
        self._update(job_id, lambda job: replace(job, done=tensors, total=tensors))
        with self._publish_lock:
            if self._closing:
                raise JobInterruptedError(INTERRUPTED)
            published = self.registry.publish(
                spec.task, out, method=spec.method, ratio=spec.ratio, origin="checkpoint", quality=quality
            )
            self._update(job_id, lambda job: replace(job, version=published.version))
        return published

    def _listen(self) -> None:
        """Apply the worker's progress reports to their jobs, until shutdown sends None; between
        reports, keep this replica's unfinished jobs' shared records fresh."""
        while True:
            try:
                item = self._progress.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                self._heartbeat()
                continue
            if item is None:
                return
            job_id, done, total, tensor = item
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job.state != "running" or done < job.done:
                    continue
                job = self._jobs[job_id] = replace(job, done=done, total=total, tensor=tensor, updated=time.time())
                due = time.monotonic() - self._shared_at.get(job_id, 0.0) >= SHARE_EVERY_S or done == total
            if due:
                self._share(job)

    def _heartbeat(self) -> None:
        with self._lock:
            unfinished = [job for job in self._jobs.values() if job.state in ("queued", "running")]
            for job in unfinished:
                self._jobs[job.id] = replace(job, updated=time.time())
            unfinished = [self._jobs[job.id] for job in unfinished]
        for job in unfinished:
            self._share(job)

    def _update(self, job_id: str, change: Callable[[Job], Job]) -> None:
        """Apply `change` to the job, stamp it updated now, and share it."""
        with self._lock:
            job = self._jobs[job_id] = replace(change(self._jobs[job_id]), updated=time.time())
        self._share(job)

    def _share(self, job: Job) -> None:
        """Write the job to the shared store, never an older snapshot over a newer one (the listener,
        the job's thread and shutdown share concurrently); a store error is logged, never fails the job."""
        with self._share_lock:
            if job.updated < self._shared_updated.get(job.id, 0.0):
                return
            self._shared_updated[job.id] = job.updated
            self._shared_at[job.id] = time.monotonic()
            self._shared(lambda: self.registry.put_job(job.to_dict()))

    def _shared(self, call: Callable[[], _T]) -> _T | None:
        """`call` (a read or write of the shared job records); None when it fails, which is logged."""
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - the registry being down must not break jobs or their pages
            log.warning("shared job records unavailable: %s: %s", type(exc).__name__, exc)
            return None

    def _forget_old(self) -> None:
        """Under the lock: keep the newest KEPT_FINISHED_JOBS finished jobs."""
        finished = sorted(
            (j for j in self._jobs.values() if j.state in ("succeeded", "failed")), key=lambda j: j.created
        )
        for job in finished[: max(0, len(finished) - KEPT_FINISHED_JOBS)]:
            self._jobs.pop(job.id, None)
            self._shared_at.pop(job.id, None)
            self._shared_updated.pop(job.id, None)


def collect_leftovers(work_dir: Path, grace_s: float = 3600.0) -> list[str]:
    """Remove uploads and job scratch folders whose process is gone (or older than grace_s)."""
    cutoff = time.time() - grace_s
    removed = []
    for sub in ("uploads", "jobs"):
        folder = work_dir / sub
        for path in folder.iterdir() if folder.is_dir() else ():
            if abandoned(path, cutoff):
                _remove(path)
                removed.append(f"{sub}/{path.name}")
    return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
