"""A compression report as plain JSON values, for the index and the admin API."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from compressor import CompressionReport


def report_dict(report: CompressionReport) -> dict[str, object]:
    """A CompressionReport as plain JSON values (paths and other non-JSON values as text)."""
    plain: dict[str, object] = json.loads(json.dumps(dataclasses.asdict(report), default=str))
    return plain
