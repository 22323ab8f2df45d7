"""What the benchmarks share: where results go, the default base, their command-line shapes and main, and
what the serving benchmarks time per request and how they summarise it (ours and the vLLM peer)."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).parent
"""The bench/ folder of the repository."""
RESULTS = BENCH / "results"
"""Where every benchmark writes its results (bench/results/<name>.json unless --out says otherwise)."""
DEFAULT_BASE = Path("~/.cache/deltaserve/models/smollm2").expanduser()
"""The base the benchmarks run on unless --base says otherwise: SmolLM2-135M-Instruct as
`deltaserve models pull smollm2` provisions it."""


@dataclass(frozen=True)
class Result:
    """One scenario at one concurrency, one round: what the results files list."""

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
    """One request: its output tokens and when it started, got its first token and its last (perf_counter)."""

    tokens: int
    first: float
    last: float
    started: float


def summarise(name: str, concurrency: int, timings: list[Timing], seconds: float) -> Result:
    """The Result of `timings`, requests that ran together for `seconds` of wall time."""
    tokens = sum(t.tokens for t in timings)
    tpot = [(t.last - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]
    return Result(
        name,
        concurrency,
        len(timings),
        tokens,
        round(seconds, 3),
        round(tokens / seconds, 2),
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


def show(result: Result, *extra: object) -> None:
    """Print one measured result as a JSON line (then `extra`) as soon as it lands."""
    print(json.dumps(asdict(result)), *extra, flush=True)


def write_results(out: dict[str, Any], path: Path) -> None:
    """Write a benchmark's results as JSON and print its ratios (what to read on a shared machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["ratios"], indent=1))
    print(f"wrote {path}")


def repo_path(path: Path) -> str:
    """`path` as a results file records it: relative to the repository when inside it, else as given."""
    try:
        return str(path.resolve().relative_to(BENCH.resolve().parent))
    except ValueError:
        return str(path)


def run_benchmark(
    parse_args: Callable[[list[str] | None], argparse.Namespace],
    measure: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    argv: list[str] | None,
) -> None:
    """The main of an asyncio benchmark: parse `argv`, run `measure`, write its results to --out."""
    args = parse_args(argv)
    write_results(asyncio.run(measure(args)), args.out)


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring as the description (line breaks kept), then --base."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="HF folder of the base model")
    return p


def add_engine_options(p: argparse.ArgumentParser, threads: int = 0) -> None:
    """--threads (torch's CPU threads, default `threads`) and --device of the engine a benchmark runs."""
    p.add_argument("--threads", type=int, default=threads, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="torch device of the engine")


def add_out(p: argparse.ArgumentParser, name: str) -> None:
    """--out: the results file, by default bench/results/<name>.json."""
    p.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")


@dataclass(frozen=True)
class LoadShape:
    """The options every closed-loop serving benchmark shares (clients, prompt and output lengths, rounds,
    threads, device), with its own defaults for a full and a `--quick` run."""

    full_concurrency: str
    quick_concurrency: str
    quick_max_tokens: int
    prompt_len: int = 64
    quick_prompt_len: int = 32
    max_tokens: int = 32

    def add(self, p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--quick", action="store_true", help=f"concurrency {self.quick_concurrency}, short prompts and outputs"
        )
        p.add_argument(
            "--concurrency",
            type=str,
            default=None,
            help=f"comma-separated (default {self.full_concurrency}; quick {self.quick_concurrency})",
        )
        p.add_argument(
            "--prompt-len",
            type=int,
            default=None,
            help=f"prompt tokens (default {self.prompt_len}; quick {self.quick_prompt_len})",
        )
        p.add_argument(
            "--max-tokens",
            type=int,
            default=None,
            help=f"output tokens per request (default {self.max_tokens}; quick {self.quick_max_tokens})",
        )
        p.add_argument("--waves", type=int, default=2, help="requests per client")
        p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per concurrency; the best is reported")
        add_engine_options(p)

    def resolve(self, args: argparse.Namespace) -> argparse.Namespace:
        """Fill the defaults `--quick` decides; concurrency becomes a list of ints."""
        chosen = args.concurrency or (self.quick_concurrency if args.quick else self.full_concurrency)
        args.concurrency = [int(c) for c in chosen.split(",")]
        args.prompt_len = args.prompt_len or (self.quick_prompt_len if args.quick else self.prompt_len)
        args.max_tokens = args.max_tokens or (self.quick_max_tokens if args.quick else self.max_tokens)
        return args
