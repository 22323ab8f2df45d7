"""The storage backend behind the registry: an index of task versions and a content-addressed blob store.

Two implementations: LocalStore (a folder) and RedisStore. The registry (registry.py) adds name checks,
hashing and change notification on top; a backend only stores and reads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from server.registry.records import TaskEntry, TaskVersion

ChangeListener = Callable[[str], None]
"""Called with a task's name after it was published, rolled back or deleted (by any process)."""


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

    def subscribe(self, listener: ChangeListener) -> None:
        """Call `listener` on changes made by this or any other process sharing the store."""
        ...

    def notify(self, task: str) -> None: ...

    def close(self) -> None: ...


def digest_of(source: Path | bytes) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file or a byte string."""
    from server.model.provision import sha256_file

    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest(), len(source)
    return sha256_file(source), source.stat().st_size
