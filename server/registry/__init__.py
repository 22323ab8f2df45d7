"""Published tasks and their artifacts: an index and a blob store, on a local folder or Redis."""

from server.registry.records import (
    BlobCorruptError,
    InvalidTaskNameError,
    JobRecord,
    JobState,
    RegistryError,
    RegistryUnavailableError,
    TaskEntry,
    TaskMissingError,
    TaskVersion,
    is_task_name,
    validate_task_name,
)
from server.registry.registry import Registry, open_registry
from server.registry.view import RegistryView

__all__ = [
    "BlobCorruptError",
    "InvalidTaskNameError",
    "JobRecord",
    "JobState",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "RegistryView",
    "TaskEntry",
    "TaskMissingError",
    "TaskVersion",
    "is_task_name",
    "open_registry",
    "validate_task_name",
]
