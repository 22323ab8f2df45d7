"""Small file helpers shared by the model cache, the registry and jobs: content hashes and temp files
named by their writer's process id."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def owned_name(suffix: str) -> str:
    """A file or folder name that says which process wrote it: `<pid>-<suffix>` (see `abandoned`)."""
    return f"{os.getpid()}-{suffix}"


def abandoned(path: Path, cutoff: float) -> bool:
    """A temp file whose writer process is gone, or that is older than the cutoff."""
    pid_text = path.name.split("-", 1)[0]
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:
        pass
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False
