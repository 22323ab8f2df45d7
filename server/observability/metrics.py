"""Prometheus metrics of one app, in their own CollectorRegistry (several apps can live in one process).

Request counters and latency histograms are updated by the HTTP layer; engine and job figures are read
at scrape time from `engine.stats()` and the job manager, so they are never stale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
MONOTONIC_STATS = frozenset(
    {
        "delta_hits",
        "delta_misses",
        "delta_loads",
        "evictions",
        "load_seconds",
        "steps",
        "generated_tokens",
        "failed_requests",
        "prefix_cache_prompt_tokens",
        "prefix_cache_hit_tokens",
        "prefix_cache_evictions",
    }
)
"""Engine stats that only grow: exposed as counters (`..._total`), the rest as gauges."""
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The Prometheus metrics of one app, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "deltaserve_http_requests", "HTTP requests by route and status", ["route", "status"], registry=reg
        )
        self.request_latency = Histogram(
            "deltaserve_http_request_seconds",
            "HTTP request latency (streams: until the last byte)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.time_to_first_token = Histogram(
            "deltaserve_time_to_first_token_seconds",
            "Time to first token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.inter_token_latency = Histogram(
            "deltaserve_inter_token_seconds",
            "Time between output tokens",
            ["endpoint"],
            buckets=TOKEN_GAP_BUCKETS,
            registry=reg,
        )
        self.generation_seconds = Histogram(
            "deltaserve_generation_seconds",
            "Whole generation time",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.task_requests = Counter(
            "deltaserve_task_requests",
            "Generation requests by task and outcome (stop, length, abort, disconnected, rejected)",
            ["task", "outcome"],
            registry=reg,
        )
        self.prompt_tokens = Counter("deltaserve_prompt_tokens", "Prompt tokens by task", ["task"], registry=reg)
        self.completion_tokens = Counter(
            "deltaserve_completion_tokens", "Generated tokens by task", ["task"], registry=reg
        )

    def observe_finished(
        self, task: str, endpoint: str, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float
    ) -> None:
        """Count a finished generation: its outcome, tokens and duration."""
        self.task_requests.labels(task, outcome).inc()
        self.prompt_tokens.labels(task).inc(prompt_tokens)
        self.completion_tokens.labels(task).inc(completion_tokens)
        self.generation_seconds.labels(endpoint).observe(seconds)

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Expose every numeric field of `stats()` (a dataclass) as deltaserve_engine_<field> (gauge or counter)."""
        self.registry.register(_StatsCollector("deltaserve_engine", stats))

    def watch_jobs(self, counts: Callable[[], dict[str, int]]) -> None:
        """Expose the number of compression jobs in each state as deltaserve_jobs{state}."""
        self.registry.register(_JobCollector(counts))

    def watch_registry(self, reachable: Callable[[], bool], known_tasks: Callable[[], int]) -> None:
        """Expose whether the registry answered its last read (deltaserve_registry_reachable, 1 or 0)
        and how many tasks its last known index holds (deltaserve_registry_known_tasks)."""
        self.registry.register(_RegistryCollector(reachable, known_tasks))

    def render(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    def __init__(self, prefix: str, stats: Callable[[], EngineStats]) -> None:
        self.prefix, self.stats = prefix, stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        try:
            snapshot = self.stats()
        except Exception:  # noqa: BLE001 - a scrape never fails on a stats error
            return
        for field in dataclasses.fields(snapshot):
            value = getattr(snapshot, field.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                family = CounterMetricFamily if field.name in MONOTONIC_STATS else GaugeMetricFamily
                yield family(f"{self.prefix}_{field.name}", f"engine stats: {field.name}", value=value)


class _JobCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("deltaserve_jobs", "Compression jobs this replica holds, by state", labels=["state"])
        for state, count in sorted(self.counts().items()):
            family.add_metric([state], count)
        yield family


class _RegistryCollector(Collector):
    def __init__(self, reachable: Callable[[], bool], known_tasks: Callable[[], int]) -> None:
        self.reachable, self.known_tasks = reachable, known_tasks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "deltaserve_registry_reachable",
            "1 while the registry answers, 0 from a failed "
            "read until a full resync succeeds (known tasks serve from the last index)",
            value=int(self.reachable()),
        )
        yield GaugeMetricFamily(
            "deltaserve_registry_known_tasks",
            "Tasks in the registry index this replica last read",
            value=self.known_tasks(),
        )
