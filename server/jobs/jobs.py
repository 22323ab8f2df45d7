"""Compression jobs: an uploaded checkpoint -> check against the base -> compress -> verify -> publish.

Jobs run one at a time, off the request path: a thread of the server orchestrates each job, and the
compression itself runs in a worker process (worker.py says why), started with the first job and
kept. A job publishes only after the artifact it made loads back cleanly against the base; on any
failure nothing is published, the job records a clear error, and its upload and scratch files are
removed either way. At shutdown queued jobs are cancelled and the worker is stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from server.jobs.worker import compress_checkpoint, init_worker, spawn_context
from server.registry import Registry, TaskVersion

log = logging.getLogger("deltaserve.jobs")
JobState = Literal["queued", "running", "succeeded", "failed"]
KEPT_FINISHED_JOBS = 256


@dataclass(frozen=True)
class JobSpec:
    task: str
    checkpoint_dir: Path
    method: str
    ratio: float
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A snapshot of one compression job."""

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class JobManager:
    def __init__(self, registry: Registry, base_dir: Path, work_dir: Path) -> None:
        self.registry, self.base_dir, self.work_dir = registry, base_dir, work_dir
        self._jobs: dict[str, Job] = {}
        self._specs: dict[str, JobSpec] = {}
        """Specs of jobs not finished yet (their uploads are removed when the job ends or is cancelled)."""
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compress")
        self._progress = spawn_context().Queue()
        self._worker: ProcessPoolExecutor | None = None
        threading.Thread(target=self._listen, name="compress-progress", daemon=True).start()

    def submit(self, spec: JobSpec) -> Job:
        job = Job(id=f"job-{uuid.uuid4().hex[:16]}", task=spec.task, method=spec.method, ratio=spec.ratio)
        with self._lock:
            self._jobs[job.id] = job
            self._specs[job.id] = spec
            self._forget_old()
        self._pool.submit(self._run, job.id, spec)
        log.info("job %s queued: compress %s with %s at ratio %g", job.id, spec.task, spec.method, spec.ratio)
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: job.created)

    def counts(self) -> dict[str, int]:
        counts = {state: 0 for state in ("queued", "running", "succeeded", "failed")}
        for job in self.list():
            counts[job.state] += 1
        return counts

    def active(self, task: str) -> bool:
        """A job for `task` is queued or running."""
        return any(job.task == task and job.state in ("queued", "running") for job in self.list())

    def shutdown(self, wait: bool = False) -> None:
        """Cancel queued jobs (removing their uploads) and stop the worker; nothing half-made is published."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            queued = [job.id for job in self._jobs.values() if job.state == "queued"]
        for job_id in queued:
            self._update(job_id, state="failed", error="cancelled: the server shut down", finished=time.time())
            shutil.rmtree(self._specs.pop(job_id).checkpoint_dir, ignore_errors=True)
        if self._worker is not None:
            for process in list(getattr(self._worker, "_processes", {}).values()):
                process.terminate()  # the executor has no public way to stop a running call
            self._worker.shutdown(wait=wait, cancel_futures=True)
        self._pool.shutdown(wait=wait)
        self._progress.put(None)

    def _run(self, job_id: str, spec: JobSpec) -> None:
        with self._lock:
            if self._jobs[job_id].state != "queued":
                return
        self._update(job_id, state="running", started=time.time())
        scratch = self.work_dir / "jobs" / f"{os.getpid()}-{job_id}"
        try:
            published = self._compress_and_publish(job_id, spec, scratch)
            self._update(job_id, state="succeeded", version=published.version, finished=time.time())
            log.info("job %s published %s version %d", job_id, spec.task, published.version)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            self._update(job_id, state="failed", error=message, finished=time.time())
            log.warning("job %s failed, nothing published: %s", job_id, message)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
            with self._lock:
                self._specs.pop(job_id, None)

    def _compress_and_publish(self, job_id: str, spec: JobSpec, scratch: Path) -> TaskVersion:
        scratch.mkdir(parents=True, exist_ok=True)
        out = scratch / "artifact.safetensors"
        if self._worker is None:
            self._worker = ProcessPoolExecutor(max_workers=1, mp_context=spawn_context(), initializer=init_worker,
                                               initargs=(self._progress,))
        quality, tensors = self._worker.submit(compress_checkpoint, job_id, self.base_dir, spec.checkpoint_dir,
                                               out, spec.method, spec.ratio, spec.seed, spec.params).result()
        self._update(job_id, done=tensors, total=tensors)
        return self.registry.publish(spec.task, out, method=spec.method, ratio=spec.ratio, origin="checkpoint",
                                     quality=quality)

    def _listen(self) -> None:
        """Apply the worker's progress reports to their jobs, until shutdown sends None."""
        while (item := self._progress.get()) is not None:
            job_id, done, total, tensor = item
            with self._lock:
                job = self._jobs.get(job_id)
                if job is not None and job.state == "running" and done >= job.done:
                    self._jobs[job_id] = replace(job, done=done, total=total, tensor=tensor)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            self._jobs[job_id] = replace(self._jobs[job_id], **changes)

    def _forget_old(self) -> None:
        """Under the lock: keep the newest KEPT_FINISHED_JOBS finished jobs."""
        finished = sorted((j for j in self._jobs.values() if j.state in ("succeeded", "failed")),
                          key=lambda j: j.created)
        for job in finished[:max(0, len(finished) - KEPT_FINISHED_JOBS)]:
            self._jobs.pop(job.id, None)


def collect_leftovers(work_dir: Path, grace_s: float = 3600.0) -> list[str]:
    """Remove uploads and job scratch folders whose process is gone (or older than grace_s)."""
    from server.registry.local import abandoned

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
