"""Waiting for a condition in tests that watch other processes or threads catch up."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], deadline_s: float, poll_s: float = 0.02) -> float | None:
    """Seconds until `check` held, or None when it did not within the deadline."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > deadline_s:
            return None
        time.sleep(poll_s)
    return time.monotonic() - start
