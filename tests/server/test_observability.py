"""JSON log lines carry the request id; engine stats become gauges and counters."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from server.observability.logging import JsonFormatter, request_id_var
from server.observability.metrics import Metrics


def test_log_lines_are_json_with_the_request_id_and_extras() -> None:
    record = logging.makeLogRecord(
        {"name": "deltaserve.x", "levelname": "INFO", "msg": "served %s", "args": ("math",), "status": 200}
    )
    token = request_id_var.set("req-42")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "served math" and line["request_id"] == "req-42" and line["status"] == 200
    assert "request_id" not in json.loads(JsonFormatter().format(record))


@dataclass(frozen=True)
class _Stats:
    queue_depth: int
    delta_hits: int
    resident_tasks: tuple[str, ...]


def test_engine_stats_are_exposed_at_scrape_time() -> None:
    metrics, current = Metrics(), [_Stats(3, 10, ("a",))]
    metrics.watch_engine(lambda: current[0])
    metrics.watch_jobs(lambda: {"running": 1, "failed": 0})
    text = metrics.render().decode()
    assert "deltaserve_engine_queue_depth 3.0" in text and "deltaserve_engine_delta_hits_total 10.0" in text
    assert "resident_tasks" not in text and 'deltaserve_jobs{state="running"} 1.0' in text
    current[0] = _Stats(0, 11, ())
    assert "deltaserve_engine_queue_depth 0.0" in metrics.render().decode()
