"""The local-directory registry backend: the embedded default, no server needed.

Layout under the root:
    blobs/<sha256>        artifacts, content-addressed, written to tmp/ first and renamed in
    index/<task>.json     {"current": n, "next": n, "versions": {"n": TaskVersion}} (written the same way)
    tmp/<pid>-<uuid>      files being written; a crash leaves them here for collect_garbage
    index.lock            flock held for every read-modify-write of the index
    jobs/<job id>.json    compression jobs' records, shared by the processes on this folder
Change notification: listeners in this process are called at once; other processes on the same
folder (several servers on one shared volume) see a change by polling index/ every POLL_S seconds.
Replicas on different machines share a Redis registry instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypedDict, cast

from server.files import abandoned, owned_name
from server.registry.records import JobRecord, TaskEntry, TaskVersion, job_record_from_json
from server.registry.store import (
    JOB_TTL_S,
    ChangeListener,
    Resync,
    Store,
    announce,
    checked_blob,
    checked_job_id,
    referenced_blobs,
    valid_job_id,
)

POLL_S = 1.0
"""How often a subscribed store looks for index changes made by other processes."""


class _IndexFile(TypedDict):
    """One task's file under index/."""

    current: int
    next: int
    versions: dict[str, dict[str, Any]]
    """Version number (as text) -> that TaskVersion's fields as JSON values."""


class LocalStore(Store):
    """The registry's backend on a local folder (see the module's docstring for its layout).
    Each method does what the Store protocol it implements says."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("blobs", "index", "tmp", "jobs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._listeners: list[ChangeListener] = []
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._seen: dict[str, tuple[int, int] | None] = {}
        self._seen_lock = threading.Lock()

    def put_blob(self, sha256: str, source: Path | bytes) -> None:
        target = self._blob_path(sha256)
        if target.is_file():
            os.utime(target)
            return
        tmp = self._tmp_path()
        if isinstance(source, bytes):
            tmp.write_bytes(source)
        else:
            shutil.copyfile(source, tmp)
        _fsync(tmp)
        os.replace(tmp, target)

    def read_blob(self, sha256: str) -> bytes:
        try:
            data: bytes | None = self._blob_path(sha256).read_bytes()
        except FileNotFoundError:
            data = None
        return checked_blob(data, sha256, str(self.root / "blobs"))

    def delete_blob(self, sha256: str) -> None:
        self._blob_path(sha256).unlink(missing_ok=True)

    def blob_digests(self) -> set[str]:
        return {p.name for p in (self.root / "blobs").iterdir()}

    def add_version(self, version: TaskVersion) -> TaskVersion:
        with self._locked():
            raw = self._read_raw(version.task) or _IndexFile(current=0, next=1, versions={})
            numbered = replace(version, version=int(raw["next"]))
            raw["versions"][str(numbered.version)] = asdict(numbered)
            raw["current"] = numbered.version
            raw["next"] = numbered.version + 1
            self._write_raw(version.task, raw)
        return numbered

    def entry(self, task: str) -> TaskEntry | None:
        raw = self._read_raw(task)
        return None if raw is None else _entry_from_raw(task, raw)

    def entries(self) -> list[TaskEntry]:
        found = (self.entry(name) for name in self.task_names())
        return [entry for entry in found if entry is not None]

    def task_names(self) -> list[str]:
        return sorted(p.stem for p in (self.root / "index").glob("*.json"))

    def set_current(self, task: str, version: int) -> bool:
        with self._locked():
            raw = self._read_raw(task)
            if raw is None or str(version) not in raw["versions"]:
                return False
            raw["current"] = version
            self._write_raw(task, raw)
        return True

    def delete_task(self, task: str) -> TaskEntry | None:
        with self._locked():
            raw = self._read_raw(task)
            if raw is None:
                return None
            self._index_path(task).unlink()
        return _entry_from_raw(task, raw)

    def collect_garbage(self, grace_s: float) -> list[str]:
        cutoff = time.time() - grace_s
        removed = [p.name for p in (self.root / "tmp").iterdir() if abandoned(p, cutoff)]
        for name in removed:
            (self.root / "tmp" / name).unlink(missing_ok=True)
        with self._locked():
            referenced = referenced_blobs(self.entries())
            orphans = [
                p for p in (self.root / "blobs").iterdir() if p.name not in referenced and p.stat().st_mtime < cutoff
            ]
            for blob in orphans:
                blob.unlink(missing_ok=True)
        return removed + [f"blobs/{p.name}" for p in orphans]

    def put_job(self, record: JobRecord) -> None:
        job_id = checked_job_id(record)
        tmp = self._tmp_path()
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.root / "jobs" / f"{job_id}.json")

    def job(self, job_id: str) -> JobRecord | None:
        if not valid_job_id(job_id):
            return None
        return self._read_job(self.root / "jobs" / f"{job_id}.json", time.time() - JOB_TTL_S)

    def jobs(self) -> list[JobRecord]:
        cutoff = time.time() - JOB_TTL_S
        found = (self._read_job(path, cutoff) for path in (self.root / "jobs").glob("*.json"))
        return [record for record in found if record is not None]

    def _read_job(self, path: Path, cutoff: float) -> JobRecord | None:
        """The record, or None when missing, unreadable or expired (an expired one is removed)."""
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                return None
            return job_record_from_json(path.read_text())
        except (OSError, ValueError):
            return None

    def subscribe(self, listener: ChangeListener, resync: Resync | None = None) -> None:
        """`resync` is not needed here: the watch compares whole index states, so it misses nothing."""
        self._listeners.append(listener)
        if self._watcher is None:
            self._seen = self._index_state()
            self._watcher = threading.Thread(target=self._watch, name="registry-watch", daemon=True)
            self._watcher.start()

    def notify(self, task: str) -> None:
        """Called after this process changed `task`: its listeners hear it now, and the watch takes
        the new index state as seen (so it does not announce the change a second time)."""
        with self._seen_lock:
            self._seen = self._seen | {task: self._task_state(task)}
        announce(self._listeners, task)

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * POLL_S)
        self._listeners.clear()

    def _task_state(self, task: str) -> tuple[int, int] | None:
        try:
            stat = self._index_path(task).stat()
        except FileNotFoundError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def _index_state(self) -> dict[str, tuple[int, int] | None]:
        return {path.stem: self._task_state(path.stem) for path in (self.root / "index").glob("*.json")}

    def _watch(self) -> None:
        """Tell the listeners about tasks whose index file another process created, changed or removed."""
        while not self._stop.wait(POLL_S):
            now = self._index_state()
            with self._seen_lock:
                changed = [t for t in sorted(set(self._seen) | set(now)) if self._seen.get(t) != now.get(t)]
                self._seen = now
            for task in changed:
                announce(self._listeners, task)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256

    def _index_path(self, task: str) -> Path:
        return self.root / "index" / f"{task}.json"

    def _tmp_path(self) -> Path:
        return self.root / "tmp" / owned_name(uuid.uuid4().hex)

    def _read_raw(self, task: str) -> _IndexFile | None:
        try:
            text = self._index_path(task).read_text()
        except FileNotFoundError:
            return None
        return cast(_IndexFile, json.loads(text))  # JSON that _write_raw wrote from an _IndexFile

    def _write_raw(self, task: str, raw: _IndexFile) -> None:
        tmp = self._tmp_path()
        tmp.write_text(json.dumps(raw, sort_keys=True))
        _fsync(tmp)
        os.replace(tmp, self._index_path(task))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / "index.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _entry_from_raw(task: str, raw: _IndexFile) -> TaskEntry:
    versions = sorted((TaskVersion(**v) for v in raw["versions"].values()), key=lambda v: v.version)
    return TaskEntry(task=task, current=int(raw["current"]), versions=tuple(versions))


def _fsync(path: Path) -> None:
    with path.open("rb") as fh:
        os.fsync(fh.fileno())
