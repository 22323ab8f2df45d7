"""The storage backend behind the registry: an index of task versions, a content-addressed blob store,
change events, and the compression jobs' shared records.

Two implementations: LocalStore (a folder) and RedisStore; each implements the whole `Store`, which is
two protocols: `TaskStore` (index, blobs, events: what the registry and its view use) and `JobRecords`
(what jobs keep through the registry). The registry (registry.py) adds name checks, hashing and the
in-memory view of the index (view.py) on top; a backend only stores, reads and relays change events.
A backend that cannot be reached raises RegistryUnavailableError.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from server.files import sha256_file
from server.registry.records import BlobCorruptError, JobRecord, TaskEntry, TaskVersion

log = logging.getLogger("deltaserve.registry")
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


def checked_job_id(record: JobRecord) -> str:
    """The record's job id, to name its file or key; ValueError when it is not a valid one."""
    job_id = record["id"]
    if not valid_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return job_id


class TaskStore(Protocol):
    """The index of task versions, the blobs they point to, and the change events between processes."""

    def put_blob(self, sha256: str, source: Path | bytes) -> None:
        """Store the artifact under its sha256, atomically: it exists whole or not at all."""
        ...

    def read_blob(self, sha256: str) -> bytes:
        """The blob's bytes, hash-checked; BlobCorruptError when missing or not matching."""
        ...

    def delete_blob(self, sha256: str) -> None:
        """Remove the blob, if stored."""
        ...

    def blob_digests(self) -> set[str]:
        """The sha256 of every stored blob."""
        ...

    def add_version(self, version: TaskVersion) -> TaskVersion:
        """Record a new version (its number assigned here) and point the task to it, atomically."""
        ...

    def entry(self, task: str) -> TaskEntry | None:
        """The task's entry as stored now; None when there is no such task."""
        ...

    def entries(self) -> list[TaskEntry]:
        """Every task's entry (the whole index), by name."""
        ...

    def task_names(self) -> list[str]:
        """Every task's name, sorted."""
        ...

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

    def notify(self, task: str) -> None:
        """Tell every process sharing the store (this one too) that `task` changed."""
        ...

    def close(self) -> None:
        """Stop listening for changes and release the backend's resources."""
        ...


class JobRecords(Protocol):
    """Compression jobs' records, shared by every process on the same store."""

    def put_job(self, record: JobRecord) -> None:
        """Save a job's record (keyed by its "id"), replacing the previous one; every replica sharing
        the store can read it for JOB_TTL_S after this write. ValueError for an invalid id."""
        ...

    def job(self, job_id: str) -> JobRecord | None:
        """The job's record; None when unknown, expired or the id is invalid."""
        ...

    def jobs(self) -> list[JobRecord]:
        """Every job record still kept, in no particular order."""
        ...


class Store(TaskStore, JobRecords, Protocol):
    """A whole registry backend: what LocalStore and RedisStore implement."""


def announce(listeners: Iterable[ChangeListener], task: str) -> None:
    """Call each listener with `task`; one listener's failure is logged and stops neither the others nor
    the caller (a watch or events thread, or the change that was made)."""
    call_each([functools.partial(listener, task) for listener in listeners], f"task {task}")


def call_each(callbacks: Iterable[Callable[[], None]], about: str) -> None:
    """Call each callback in turn (over a copy: one may subscribe another); a failure is logged with
    `about` and the rest are still called."""
    for callback in list(callbacks):
        try:
            callback()
        except Exception:
            log.exception("registry change callback failed (%s)", about)


def referenced_blobs(entries: Iterable[TaskEntry]) -> set[str]:
    """The sha256 of every kept version of these entries: the blobs that must not be removed."""
    return {version.sha256 for entry in entries for version in entry.versions}


def checked_blob(data: bytes | None, sha256: str, where: str) -> bytes:
    """`data` (a blob read from `where`) when it hashes to `sha256`; BlobCorruptError when it is missing
    (None) or does not match: every read of a blob is checked here."""
    if data is None:
        raise BlobCorruptError(f"artifact {sha256} is missing from {where}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BlobCorruptError(f"artifact {sha256} in {where} does not match its sha256")
    return data


def digest_of(source: Path | bytes) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file or a byte string."""

    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest(), len(source)
    return sha256_file(source), source.stat().st_size
