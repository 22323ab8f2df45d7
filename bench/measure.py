"""What the serving benchmarks time per request and how they summarise it (ours and the vLLM peer)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Result:
    scenario: str
    concurrency: int
    requests: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    tpot_ms: float
    """Mean over requests of (last token time - first token time) / (tokens - 1)."""
    ttft_ms: float


@dataclass(frozen=True)
class Timing:
    tokens: int
    first: float
    last: float
    started: float


def summarise(name: str, concurrency: int, timings: list[Timing], seconds: float) -> Result:
    tokens = sum(t.tokens for t in timings)
    tpot = [(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]
    return Result(
        name, concurrency, len(timings), tokens, round(seconds, 3), round(tokens / seconds, 2),
        round(1000 * statistics.mean(tpot), 2) if tpot else 0.0,
        round(1000 * statistics.mean(t.first - t.started for t in timings), 2),
    )


def best_of(rounds: list[Result]) -> list[Result]:
    """The fastest round of each (scenario, concurrency): the machine is shared, noise only slows."""
    best: dict[tuple[str, int], Result] = {}
    for r in rounds:
        key = (r.scenario, r.concurrency)
        if key not in best or r.tokens_per_s > best[key].tokens_per_s:
            best[key] = r
    return list(best.values())


def write_results(out: dict, path: Path) -> None:
    """Write a benchmark's results as JSON and print its ratios (what to read on a shared machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios"], indent=1))
    print(f"wrote {path}")
