"""Published tasks and their artifacts: an index and a blob store, on a local folder or Redis."""

from server.engine.types import RegistryUnavailableError
from server.registry.records import (
    BlobCorruptError,
    InvalidTaskNameError,
    RegistryError,
    TaskEntry,
    TaskMissingError,
    TaskVersion,
    validate_task_name,
)
from server.registry.registry import Registry, open_registry
from server.registry.view import RegistryView

__all__ = [
    "BlobCorruptError",
    "InvalidTaskNameError",
    "Registry",
    "RegistryError",
    "RegistryUnavailableError",
    "RegistryView",
    "TaskEntry",
    "TaskMissingError",
    "TaskVersion",
    "open_registry",
    "validate_task_name",
]
