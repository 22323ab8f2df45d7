"""Prefix-cache benchmark: TTFT and tokens/s with DELTASERVE_PREFIX_CACHE off and on, in one run.

Two engines on the same base and the same 16 tasks stay resident in one process, one with the prefix
cache off and one with it on; every workload runs on both, back to back, with the same prompts:
  conversations  16 tasks, each with its own system prompt (--system-len tokens of random ids); one
                 conversation per task of --turns user turns (--user-len tokens each): turn k's prompt
                 is the system prompt, the earlier turns and their answers, then the new turn;
                 --max-tokens greedy tokens per answer; --concurrency clients take conversations in turn
  probe          after the conversations, one new question per task (system prompt + a fresh user turn)
                 sent alone: the TTFT of a cached system prompt against an uncached one, no queueing
  noshare        --noshare-requests requests of --noshare-len fresh random tokens (nothing to reuse),
                 round-robin over the tasks, --concurrency clients: the cache's cost when it never hits;
                 --noshare-rounds rounds, each with new prompts, the order of the engines alternating,
                 the best round of each reported (the CPU is shared: noise only slows)
Deltas: same-ratio synthetic ones, as bench/serving.py makes them (random fine-tunes of the base
compressed by ImPart, cached under its work folder), reused round-robin over the 16 task names; every
task name is its own resident delta and its own prefix-cache key.

    .venv/bin/python bench/prefix.py --threads 1        # SmolLM2-135M, ~10 min on a shared 2-core CPU
Results: bench/results/prefix.json (--out); docs/engine.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # as a script, bench/kernels.py would shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.measure import (
    Result,
    Timing,
    add_engine_options,
    add_out,
    bench_parser,
    best_of,
    repo_path,
    run_benchmark,
    show,
    summarise,
)
from bench.serving import make_engine, synthetic_artifacts, task_folder
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, SamplingParams

TASKS = 16
Prompt = tuple[int, ...]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--distinct", type=int, default=2, help="synthetic artifacts, reused over the 16 task names")
    p.add_argument("--ratio", type=float, default=32.0, help="ImPart compression ratio of the synthetic artifacts")
    p.add_argument("--system-len", type=int, default=1000, help="tokens of each task's system prompt")
    p.add_argument("--turns", type=int, default=4, help="user turns per conversation")
    p.add_argument("--user-len", type=int, default=32, help="tokens of each user turn")
    p.add_argument("--max-tokens", type=int, default=16, help="greedy output tokens per answer")
    p.add_argument("--concurrency", type=int, default=4, help="clients of the conversations and noshare workloads")
    p.add_argument("--noshare-requests", type=int, default=32)
    p.add_argument("--noshare-len", type=int, default=256, help="prompt tokens of each noshare request")
    p.add_argument("--noshare-rounds", type=int, default=3)
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    add_engine_options(p)
    p.add_argument("--seed", type=int, default=0)
    add_out(p, "prefix")
    return p.parse_args(argv)


def random_tokens(rng: random.Random, count: int, vocab: int) -> Prompt:
    return tuple(rng.randrange(100, vocab - 100) for _ in range(count))


async def ask(engine: Engine, rid: str, task: str | None, prompt: Prompt, max_tokens: int) -> tuple[Timing, Prompt]:
    """One greedy request: its timing and its output tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    first = last = 0.0
    tokens: list[int] = []
    async for chunk in engine.generate(GenerationRequest(rid, task, prompt, params)):
        last = time.perf_counter()
        first = first or last
        tokens.extend(chunk.token_ids)
    return Timing(len(tokens), first, last, started), tuple(tokens)


async def conversation(engine: Engine, task: str, system: Prompt, users: list[Prompt], max_tokens: int) -> list[Timing]:
    """The task's conversation, turn after turn, each prompt holding everything said before."""
    history, timings = system, []
    for k, user in enumerate(users):
        history += user
        timing, answer = await ask(engine, f"{task}-turn{k}", task, history, max_tokens)
        history += answer
        timings.append(timing)
    return timings


async def run_conversations(
    engine: Engine, name: str, workload: dict[str, tuple[Prompt, list[Prompt]]], args: argparse.Namespace
) -> tuple[Result, list[list[Timing]]]:
    """Every task's conversation, --concurrency at a time; the summary and each conversation's timings."""
    queue = list(workload)
    done: list[list[Timing]] = []

    async def client() -> None:
        while queue:
            task = queue.pop(0)
            system, users = workload[task]
            done.append(await conversation(engine, task, system, users, args.max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - started
    return summarise(name, args.concurrency, [t for conv in done for t in conv], seconds), done


async def run_probe(engine: Engine, name: str, probes: dict[str, Prompt], args: argparse.Namespace) -> Result:
    """One question per task, alone: its system prompt (cached when the cache is on) and a fresh turn."""
    timings, started = [], time.perf_counter()
    for task, prompt in probes.items():
        timings.append((await ask(engine, f"{task}-probe", task, prompt, args.max_tokens))[0])
    return summarise(name, 1, timings, time.perf_counter() - started)


async def run_noshare(engine: Engine, name: str, prompts: list[tuple[str, Prompt]], args: argparse.Namespace) -> Result:
    queue = list(enumerate(prompts))
    timings: list[Timing] = []

    async def client() -> None:
        while queue:
            i, (task, prompt) = queue.pop(0)
            timings.append((await ask(engine, f"noshare{i}", task, prompt, args.max_tokens))[0])

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(args.concurrency)))
    return summarise(name, args.concurrency, timings, time.perf_counter() - started)


def workloads(
    args: argparse.Namespace, names: list[str], vocab: int
) -> tuple[dict[str, tuple[Prompt, list[Prompt]]], dict[str, Prompt]]:
    """Conversations (system prompt, user turns) per task, and one probe per task."""
    rng = random.Random(args.seed)
    conv = {
        task: (
            random_tokens(rng, args.system_len, vocab),
            [random_tokens(rng, args.user_len, vocab) for _ in range(args.turns)],
        )
        for task in names
    }
    probes = {task: conv[task][0] + random_tokens(rng, args.user_len, vocab) for task in names}
    return conv, probes


def noshare_prompts(args: argparse.Namespace, names: list[str], vocab: int, round_: int) -> list[tuple[str, Prompt]]:
    """One round's noshare requests: prompts no earlier request shares a block with."""
    rng = random.Random(f"noshare-{args.seed}-{round_}")
    return [(names[i % len(names)], random_tokens(rng, args.noshare_len, vocab)) for i in range(args.noshare_requests)]


async def warm(engine: Engine, names: list[str], vocab: int) -> None:
    """Every delta resident and the code paths run once (loads are not timed)."""
    rng = random.Random(-1)
    for task in names:
        await engine.prefetch(task)
    for task in (None, names[0]):
        await ask(engine, f"warm-{task}", task, random_tokens(rng, 300, vocab), 2)


def turn_ttft_ms(conversations: list[list[Timing]]) -> list[float]:
    """Mean TTFT of each turn index over the conversations."""
    turns = len(conversations[0])
    return [round(1000 * statistics.mean(c[k].first - c[k].started for c in conversations), 1) for k in range(turns)]


async def measure(engines: dict[str, Engine], names: list[str], args: argparse.Namespace) -> dict[str, object]:
    vocab = engines["off"].config.vocab_size
    conv, probes = workloads(args, names, vocab)
    results: list[Result] = []
    turns: dict[str, list[float]] = {}
    for mode, engine in engines.items():
        result, conversations = await run_conversations(engine, f"conversations-{mode}", conv, args)
        results.append(result)
        turns[mode] = turn_ttft_ms(conversations)
        show(result, turns[mode])
    for mode, engine in engines.items():
        results.append(await run_probe(engine, f"probe-{mode}", probes, args))
        show(results[-1])
    rounds = []
    for r in range(args.noshare_rounds):
        prompts = noshare_prompts(args, names, vocab, r)
        for mode in ("on", "off") if r % 2 == 0 else ("off", "on"):
            rounds.append(await run_noshare(engines[mode], f"noshare-{mode}", prompts, args))
            show(rounds[-1])
    return {"results": results + best_of(rounds), "noshare_rounds": rounds, "turn_ttft_ms": turns}


def ratios(results: list[Result], turns: dict[str, list[float]]) -> dict[str, float]:
    by = {r.scenario: r for r in results}

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else 0.0

    later = {mode: statistics.mean(ttft[1:]) for mode, ttft in turns.items()}
    return {
        "probe_ttft_on/off (goal <= 0.25)": ratio(by["probe-on"].ttft_ms, by["probe-off"].ttft_ms),
        "conversation_turn1_ttft_on/off": ratio(turns["on"][0], turns["off"][0]),
        "conversation_later_turns_ttft_on/off": ratio(later["on"], later["off"]),
        "conversation_tokens_per_s_on/off": ratio(
            by["conversations-on"].tokens_per_s, by["conversations-off"].tokens_per_s
        ),
        "noshare_tokens_per_s_on/off (goal >= 1)": ratio(by["noshare-on"].tokens_per_s, by["noshare-off"].tokens_per_s),
        "noshare_ttft_on/off": ratio(by["noshare-on"].ttft_ms, by["noshare-off"].ttft_ms),
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    artifacts, compress_s = synthetic_artifacts(args.base, args.distinct, args.ratio)
    folder, mapping = task_folder(artifacts, TASKS)
    names = list(mapping)
    engines = {
        mode: make_engine(args, folder, max_batch_tokens=args.max_batch_tokens, prefix_cache=mode == "on")
        for mode in ("off", "on")
    }
    for engine in engines.values():
        await engine.start()
        await warm(engine, names, engine.config.vocab_size)
    measured = await measure(engines, names, args)
    stats = {mode: asdict(engine.stats()) for mode, engine in engines.items()}
    for engine in engines.values():
        await engine.stop()
    return report(args, measured, stats, compress_s)


def report(
    args: argparse.Namespace, measured: dict[str, object], stats: dict[str, dict], compress_s: list[float]
) -> dict[str, object]:
    results: list[Result] = measured["results"]  # type: ignore[assignment]
    turns: dict[str, list[float]] = measured["turn_ttft_ms"]  # type: ignore[assignment]
    keep = (
        "prefix_cache_prompt_tokens",
        "prefix_cache_hit_tokens",
        "prefix_cache_hit_rate",
        "prefix_cache_blocks",
        "prefix_cache_evictions",
        "kv_blocks_total",
        "generated_tokens",
        "steps",
    )
    return {
        "command": "python bench/prefix.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "config": {k: (repo_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "deltas": {"synthetic": args.distinct, "ratio": args.ratio, "tasks": TASKS, "compress_seconds": compress_s},
        "results": [asdict(r) for r in results],
        "turn_ttft_ms": turns,
        "noshare_rounds": [asdict(r) for r in measured["noshare_rounds"]],  # type: ignore[attr-defined]
        "engine": {mode: {k: s[k] for k in keep} for mode, s in stats.items()},
        "ratios": ratios(results, turns),
        "notes": [
            "both engines resident in one process; each workload runs on both back to back, same prompts",
            "TTFT includes queueing behind other clients' prefills (conversations, noshare); the probe has none",
        ],
    }


def main(argv: list[str] | None = None) -> None:
    """Run the prefix-cache benchmark and write its results."""
    run_benchmark(parse_args, main_async, argv)


if __name__ == "__main__":
    main()
