"""What the registry keeps: one frozen dataclass per published version, the compression jobs' shared
records, and the errors."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Literal, TypedDict, cast

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A task name: letters, digits, `.`, `_`, `-`; starts with a letter or digit; at most 64 characters."""


class RegistryError(Exception):
    """Base of the registry's errors."""


class InvalidTaskNameError(RegistryError, ValueError):
    """A task name that could escape a folder or a key prefix, or is otherwise not allowed."""


class RegistryUnavailableError(RegistryError):
    """The registry cannot be reached and the answer is not in its last known index (HTTP 503 with
    code registry_unavailable and Retry-After)."""


class TaskMissingError(RegistryError, LookupError):
    """No published task (or no such version of it) under that name."""


class BlobCorruptError(RegistryError):
    """A stored artifact's bytes do not hash to the sha256 the index records (or are gone)."""


def is_task_name(name: str) -> bool:
    """Whether `name` is a valid task name (TASK_NAME, and no `..` anywhere)."""
    return TASK_NAME.fullmatch(name) is not None and ".." not in name


def validate_task_name(name: str) -> str:
    """`name` when it is a valid task name; else InvalidTaskNameError saying what is allowed."""
    if not is_task_name(name):
        raise InvalidTaskNameError(
            f"invalid task name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit, without '..'"
        )
    return name


@dataclass(frozen=True)
class TaskVersion:
    """One published version of one task: its artifact blob and what made it. A request resolves its task
    to one of these once and carries it; the engine serves exactly that version (by its sha256)."""

    task: str
    version: int
    sha256: str
    size: int
    method: str = "impart"
    ratio: float | None = None
    created: float = 0.0
    source: str = "artifact"
    """How it arrived: `checkpoint` (uploaded and compressed here) or `artifact` (uploaded ready)."""
    quality: dict[str, object] = field(default_factory=dict, hash=False)
    """The compression report's quality figures (JSON-able); not part of the hash (a dict is not hashable)."""

    def to_json(self) -> str:
        """The version as a JSON object (keys sorted): how the Redis index stores it."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> TaskVersion:
        """The version `to_json` wrote."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class TaskEntry:
    """A task as the index holds it: every kept version and the one it points to."""

    task: str
    current: int
    versions: tuple[TaskVersion, ...]
    """Oldest first."""

    @property
    def current_version(self) -> TaskVersion:
        """The version the task points to; TaskMissingError when that version is not kept."""
        for found in self.versions:
            if found.version == self.current:
                return found
        raise TaskMissingError(f"task {self.task!r} points to version {self.current}, which is not kept")


JobState = Literal["queued", "running", "succeeded", "failed"]


class JobRecord(TypedDict):
    """A compression job's shared record, as the store keeps it (JSON) for every replica to read: the
    fields of `server.jobs.Job`, which writes and reads it (a test keeps the two field lists equal)."""

    id: str
    task: str
    method: str
    ratio: float
    state: JobState
    done: int
    total: int
    tensor: str
    error: str | None
    version: int | None
    created: float
    started: float | None
    finished: float | None
    replica: str
    updated: float


def job_record_from_json(text: str | bytes) -> JobRecord:
    """A stored job record, keeping only JobRecord's keys (a newer replica may write more); ValueError
    when the text is not a JSON object."""
    loaded = json.loads(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"a job record is a JSON object, not {type(loaded).__name__}")
    known = {key: value for key, value in loaded.items() if key in JobRecord.__annotations__}
    # JSON from the store: put_job wrote it from a Job, so its values have JobRecord's types
    return cast(JobRecord, known)
