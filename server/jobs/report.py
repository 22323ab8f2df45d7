"""A compression report as plain JSON values, for the index and the admin API."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def report_dict(report: Any) -> dict[str, Any]:
    """A CompressionReport (a dataclass or any object) as plain JSON values."""
    raw = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
    return json.loads(json.dumps(raw, default=str))
