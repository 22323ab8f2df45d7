"""The registry: published tasks and their artifacts, over a Store backend. Implements DeltaSource.

Publish is blob first (content-addressed by sha256), index entry last, so a task is visible only when
its artifact is whole. Reads of the index go through the RegistryView (view.py), the last known index
in memory; this process's own changes reach it at once, other processes' by events and resync, and
every change of it is announced to listeners (the engine retires stale resident deltas).

The registry is also where compression jobs keep their shared records (put_job, job, jobs): the
store's JobRecords, so every replica sharing the store answers for every job.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from server.config import Settings
from server.registry.local import LocalStore
from server.registry.records import JobRecord, TaskEntry, TaskMissingError, TaskVersion, validate_task_name
from server.registry.store import ChangeListener, Store, digest_of, referenced_blobs
from server.registry.view import RegistryView

log = logging.getLogger("deltaserve.registry")
GARBAGE_GRACE_S = 3600.0
"""Leftovers younger than this are left alone: another process may still be publishing them."""


class Registry:
    """Published tasks and their artifacts over one Store, and the jobs' shared records."""

    def __init__(self, store: Store, resync_s: float = 0.5) -> None:
        self.store = store
        self.view = RegistryView(store, resync_s)

    def publish(
        self,
        task: str,
        source: Path | bytes,
        *,
        method: str,
        ratio: float | None,
        origin: str = "artifact",
        quality: dict[str, object] | None = None,
    ) -> TaskVersion:
        """Store the artifact and make it the task's new current version; returns that version."""
        validate_task_name(task)
        sha256, size = digest_of(source)
        self.store.put_blob(sha256, source)
        draft = TaskVersion(
            task=task,
            version=0,
            sha256=sha256,
            size=size,
            method=method,
            ratio=ratio,
            created=time.time(),
            source=origin,
            quality=dict(quality or {}),
        )
        published = self.store.add_version(draft)
        log.info("published task %s version %d (%s, %d bytes)", task, published.version, sha256[:12], size)
        self._changed(task)
        return published

    def lookup(self, task: str) -> TaskVersion | None:
        """The task's current version (from the last known index; read through when unknown)."""
        return self.view.resolve(task)

    def read(self, ref: TaskVersion) -> bytes:
        """The artifact's bytes, checked against ref.sha256 by the store (the one check of a load)."""
        return self.store.read_blob(ref.sha256)

    def tasks(self) -> list[TaskVersion]:
        """Every task's current version (from the last known index), by name."""
        return [entry.current_version for entry in self.entries()]

    def entry(self, task: str) -> TaskEntry | None:
        """The task's entry (from the last known index; read through when unknown); None when none."""
        return self.view.entry(task)

    def entries(self) -> list[TaskEntry]:
        """The last known index, by name."""
        return self.view.entries()

    def rollback(self, task: str, version: int) -> TaskVersion:
        """Point `task` back (or forward) to a kept version."""
        validate_task_name(task)
        if not self.store.set_current(task, version):
            raise TaskMissingError(f"task {task!r} has no version {version}")
        self._changed(task)
        return self.require(task).current_version

    def delete(self, task: str) -> TaskEntry:
        """Remove the task and every version; blobs no other task uses are removed too."""
        validate_task_name(task)
        removed = self.store.delete_task(task)
        if removed is None:
            raise TaskMissingError(f"no task named {task!r}")
        self._changed(task)
        for sha in referenced_blobs([removed]) - referenced_blobs(self.store.entries()):
            self.store.delete_blob(sha)
        log.info("deleted task %s (%d versions)", task, len(removed.versions))
        return removed

    def require(self, task: str) -> TaskEntry:
        """The task's entry; TaskMissingError when there is no such task."""
        found = self.entry(task)
        if found is None:
            raise TaskMissingError(f"no task named {task!r}")
        return found

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener` with a task's name whenever its entry changes (here or in another process)."""
        self.view.subscribe(listener)

    def ensure_reachable(self) -> None:
        """Read the index now; RegistryUnavailableError when the store cannot be reached (refuse a write
        up front rather than fail it half way)."""
        self.view.sync(raising=True)

    def start(self) -> None:
        """Keep the view current: listen to the store's events and resync periodically."""
        self.view.start()

    def collect_garbage(self, grace_s: float = GARBAGE_GRACE_S) -> list[str]:
        """Remove the store's leftovers older than grace_s; what was removed."""
        removed = self.store.collect_garbage(grace_s)
        if removed:
            log.info("registry collected %d leftovers", len(removed))
        return removed

    def put_job(self, record: JobRecord) -> None:
        """Save a compression job's shared record (replacing its previous one); ValueError for an
        invalid id, RegistryUnavailableError when the store cannot be reached."""
        self.store.put_job(record)

    def job(self, job_id: str) -> JobRecord | None:
        """A job's shared record, written by any replica; None when unknown or expired."""
        return self.store.job(job_id)

    def jobs(self) -> list[JobRecord]:
        """Every job record the store still keeps, in no particular order."""
        return self.store.jobs()

    def close(self) -> None:
        """Stop keeping the view current and close the store."""
        self.view.close()
        self.store.close()

    def _changed(self, task: str) -> None:
        """After this process changed `task`: the view takes it now, then other processes hear of it."""
        self.view.refresh(task)
        self.store.notify(task)


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name: a local folder, or a shared Redis."""
    if settings.registry == "redis":
        from server.registry.redis_store import RedisStore

        return Registry(RedisStore(settings.redis_url, timeout_s=settings.registry_timeout), settings.registry_resync_s)
    return Registry(LocalStore(settings.resolved(settings.registry_dir)), settings.registry_resync_s)
