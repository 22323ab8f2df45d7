"""LocalDirDeltaSource: a folder of `<task>.safetensors` artifacts, for the engine's tests and benchmarks."""

from __future__ import annotations

import hashlib
from pathlib import Path

from server.registry import TaskVersion, is_task_name

SUFFIX = ".safetensors"


class LocalDirDeltaSource:
    """Implements DeltaSource over `folder/<task>.safetensors`; the version is always 1 and the sha256
    tells versions apart (a replaced file is a new one)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._digests: dict[str, tuple[tuple[int, int, int], str]] = {}
        """task -> (the file's (inode, mtime_ns, size), its sha256): a lookup hashes a file once per change."""

    def _path(self, task: str) -> Path | None:
        if not is_task_name(task):
            return None
        path = self.folder / f"{task}{SUFFIX}"
        return path if path.is_file() else None

    def lookup(self, task: str) -> TaskVersion | None:
        """The task's version: its file's sha256 (hashed again only when the file changed)."""
        path = self._path(task)
        if path is None:
            return None
        stat = path.stat()
        state = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        known = self._digests.get(task)
        if known is None or known[0] != state:
            known = self._digests[task] = (state, hashlib.sha256(path.read_bytes()).hexdigest())
        return TaskVersion(task, 1, known[1], stat.st_size, created=stat.st_mtime)

    def read(self, ref: TaskVersion) -> bytes:
        """The file's bytes; ValueError when they no longer hash to `ref`'s sha256."""
        path = self._path(ref.task)
        if path is None:
            raise FileNotFoundError(f"{ref.task}: no artifact in {self.folder}")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise ValueError(f"{path}: sha256 does not match {ref.sha256} (changed since lookup)")
        return data

    def tasks(self) -> list[TaskVersion]:
        """Every task with an artifact in the folder."""
        names = sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}"))
        return [ref for ref in map(self.lookup, names) if ref is not None]
