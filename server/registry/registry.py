"""The registry: published tasks and their artifacts, over a Store backend. Implements DeltaSource.

Publish is blob first (content-addressed by sha256), index entry last, so a task is visible only when
its artifact is whole. Every change is announced to listeners (the engine drops stale resident deltas).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from server.config import Settings
from server.engine.types import TaskRef
from server.registry.local import LocalStore
from server.registry.records import TaskEntry, TaskMissingError, TaskVersion, validate_task_name
from server.registry.store import ChangeListener, Store, digest_of

log = logging.getLogger("deltaserve.registry")
GARBAGE_GRACE_S = 3600.0
"""Leftovers younger than this are left alone: another process may still be publishing them."""


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    def publish(self, task: str, source: Path | bytes, *, method: str, ratio: float | None,
                origin: str = "artifact", quality: dict[str, Any] | None = None) -> TaskVersion:
        """Store the artifact and make it the task's new current version; returns that version."""
        validate_task_name(task)
        sha256, size = digest_of(source)
        self.store.put_blob(sha256, source)
        draft = TaskVersion(task=task, version=0, sha256=sha256, size=size, method=method, ratio=ratio,
                            created=time.time(), source=origin, quality=dict(quality or {}))
        published = self.store.add_version(draft)
        log.info("published task %s version %d (%s, %d bytes)", task, published.version, sha256[:12], size)
        self.store.notify(task)
        return published

    def lookup(self, task: str) -> TaskRef | None:
        found = self.entry(task)
        return None if found is None else found.current_version.to_ref()

    def read(self, ref: TaskRef) -> bytes:
        return self.store.read_blob(ref.sha256)

    def tasks(self) -> list[TaskRef]:
        return [entry.current_version.to_ref() for entry in self.entries()]

    def entry(self, task: str) -> TaskEntry | None:
        validate_task_name(task)
        return self.store.entry(task)

    def entries(self) -> list[TaskEntry]:
        found = (self.store.entry(name) for name in self.store.task_names())
        return [entry for entry in found if entry is not None]

    def rollback(self, task: str, version: int) -> TaskVersion:
        """Point `task` back (or forward) to a kept version."""
        validate_task_name(task)
        if not self.store.set_current(task, version):
            raise TaskMissingError(f"task {task!r} has no version {version}")
        self.store.notify(task)
        return self.require(task).current_version

    def delete(self, task: str) -> TaskEntry:
        """Remove the task and every version; blobs no other task uses are removed too."""
        validate_task_name(task)
        removed = self.store.delete_task(task)
        if removed is None:
            raise TaskMissingError(f"no task named {task!r}")
        still_used = {v.sha256 for entry in self.entries() for v in entry.versions}
        for sha in {v.sha256 for v in removed.versions} - still_used:
            self.store.delete_blob(sha)
        self.store.notify(task)
        log.info("deleted task %s (%d versions)", task, len(removed.versions))
        return removed

    def require(self, task: str) -> TaskEntry:
        found = self.entry(task)
        if found is None:
            raise TaskMissingError(f"no task named {task!r}")
        return found

    def subscribe(self, listener: ChangeListener) -> None:
        self.store.subscribe(listener)

    def collect_garbage(self, grace_s: float = GARBAGE_GRACE_S) -> list[str]:
        removed = self.store.collect_garbage(grace_s)
        if removed:
            log.info("registry collected %d leftovers", len(removed))
        return removed

    def close(self) -> None:
        self.store.close()


def open_registry(settings: Settings) -> Registry:
    """The registry the settings name: a local folder, or a shared Redis."""
    if settings.registry == "redis":
        from server.registry.redis_store import RedisStore

        return Registry(RedisStore(settings.redis_url))
    return Registry(LocalStore(settings.resolved(settings.registry_dir)))
