"""The storage backend behind the registry: an index of task versions and a content-addressed blob store.

Two implementations: LocalStore (a folder) and RedisStore. The registry (registry.py) adds name checks,
hashing and the in-memory view of the index (view.py) on top; a backend only stores, reads and
relays change events. A backend that cannot be reached raises RegistryUnavailableError.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from server.files import sha256_file
from server.registry.records import TaskEntry, TaskVersion

ChangeListener = Callable[[str], None]
"""Called with a task's name after it was published, rolled back or deleted (by any process)."""
Resync = Callable[[], None]
"""Called when changes may have been missed (the store's notification channel reconnected)."""
JOB_TTL_S = 7 * 24 * 3600
"""A job's shared record is kept this long after its last write."""
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_job_id(job_id: str) -> bool:
    """Job ids name files and keys: letters, digits, '-' and '_' only."""
    return bool(_JOB_ID.match(job_id))


class Store(Protocol):
    def put_blob(self, sha256: str, source: Path | bytes) -> None:
        """Store the artifact under its sha256, atomically: it exists whole or not at all."""
        ...

    def read_blob(self, sha256: str) -> bytes:
        """The blob's bytes, hash-checked; BlobCorruptError when missing or not matching."""
        ...

    def delete_blob(self, sha256: str) -> None: ...

    def blob_digests(self) -> set[str]: ...

    def add_version(self, version: TaskVersion) -> TaskVersion:
        """Record a new version (its number assigned here) and point the task to it, atomically."""
        ...

    def entry(self, task: str) -> TaskEntry | None: ...

    def entries(self) -> list[TaskEntry]:
        """Every task's entry (the whole index), by name."""
        ...

    def task_names(self) -> list[str]: ...

    def set_current(self, task: str, version: int) -> bool:
        """Point `task` to a kept `version`; False when there is no such version."""
        ...

    def delete_task(self, task: str) -> TaskEntry | None:
        """Remove the task and its versions from the index; the removed entry, or None."""
        ...

    def collect_garbage(self, grace_s: float) -> list[str]:
        """Remove leftovers older than grace_s (partial uploads, unreferenced blobs); what was removed."""
        ...

    def subscribe(self, listener: ChangeListener, resync: Resync | None = None) -> None:
        """Call `listener` on changes made by this or any other process sharing the store, and
        `resync` whenever changes may have been missed."""
        ...

    def put_job(self, record: dict[str, Any]) -> None:
        """Save a compression job's record (keyed by its "id"), replacing the previous one; every
        replica sharing the store can read it for JOB_TTL_S after this write."""
        ...

    def job(self, job_id: str) -> dict[str, Any] | None: ...

    def jobs(self) -> list[dict[str, Any]]:
        """Every job record still kept, in no particular order."""
        ...

    def notify(self, task: str) -> None: ...

    def close(self) -> None: ...


def digest_of(source: Path | bytes) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file or a byte string."""

    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest(), len(source)
    return sha256_file(source), source.stat().st_size
