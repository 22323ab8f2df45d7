"""Serving benchmark: output tokens/s and time per output token of the engine, one run, ratios.

Scenarios, each at every concurrency (closed loop: C clients, each sending its next request when the
previous one ends), all in the same process and run:
  base     every request on the base alone
  one      every request on one task
  mix4     requests spread round-robin over 4 distinct tasks
  mix16    ... over 16 tasks
  swap16   the naive alternative: one set of merged full weights (W_base + delta) resident at a time;
           each wave of C requests is grouped by task and the merged weights are swapped in per group
Deltas: the testbed's artifacts when --tasks-dir holds them, else same-ratio synthetic ones: a random
fine-tune of the base (server.model.synthetic.write_synthetic_finetune) compressed by ImPart at --ratio;
with fewer distinct artifacts than tasks, names reuse them round-robin (same sizes, same compute).

    .venv/bin/python bench/serving.py --quick          # concurrency 1 and 8, short outputs (a few minutes)
    .venv/bin/python bench/serving.py                  # concurrency 1, 8, 32
Results: bench/results/serving.json (--out); docs/engine.md holds the table. The machine is shared:
compare the ratios inside one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).parent.resolve():
    sys.path.pop(0)  # as a script, bench/kernels.py would shadow the `kernels` package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.measure import LoadShape, Result, Timing, add_out, bench_parser, best_of, run_benchmark, show, summarise
from server.config import load_settings
from server.engine.engine import Engine
from server.engine.sources import LocalDirDeltaSource
from server.engine.types import GenerationRequest, SamplingParams
from server.model.llama import load_state_dict

WORK = Path("/tmp/deltaserve-bench-serving")

LOAD = LoadShape(full_concurrency="1,8,32", quick_concurrency="1,8", quick_max_tokens=12)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--tasks-dir", type=Path, default=None, help="folder of <task>.safetensors artifacts")
    p.add_argument("--distinct", type=int, default=2, help="synthetic artifacts to make when --tasks-dir is absent")
    p.add_argument("--ratio", type=float, default=32.0, help="ImPart compression ratio of synthetic artifacts")
    LOAD.add(p)
    p.add_argument("--scenarios", default="base,one,mix4,mix16,swap16")
    add_out(p, "serving")
    return LOAD.resolve(p.parse_args(argv))


def synthetic_artifacts(base: Path, count: int, ratio: float) -> tuple[Path, list[float]]:
    """`count` ImPart artifacts of random fine-tunes of `base` (cached under WORK); compress seconds."""
    from compressor import compress
    from server.model.synthetic import write_synthetic_finetune

    out = WORK / base.name / f"artifacts-r{ratio:g}"
    out.mkdir(parents=True, exist_ok=True)
    seconds = []
    for i in range(count):
        target = out / f"syn{i}.safetensors"
        if not target.exists():
            tuned = write_synthetic_finetune(base, WORK / base.name / "finetune", seed=1000 + i, scale=0.05)
            started = time.perf_counter()
            compress(base, tuned, target, method="impart", ratio=ratio, seed=i)
            seconds.append(time.perf_counter() - started)
            shutil.rmtree(tuned)
    return out, seconds


def task_folder(artifacts: Path, names: int) -> tuple[Path, dict[str, Path]]:
    """A folder naming `names` tasks t0.. over the distinct artifacts, round-robin (hard links)."""
    sources = sorted(artifacts.glob("*.safetensors"))
    folder = WORK / "tasks"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    mapping = {}
    for i in range(names):
        src = sources[i % len(sources)]
        (folder / f"t{i}.safetensors").hardlink_to(src)
        mapping[f"t{i}"] = src
    return folder, mapping


def make_engine(args: argparse.Namespace, tasks: Path, **settings: object) -> Engine:
    """The benchmarks' engine on --base and --device over the artifacts of `tasks`: room for 16 resident
    tasks and 64 running requests, 1024 tokens a step; `settings` replace or add settings."""
    chosen: dict[str, object] = {
        "base_model": str(args.base),
        "device": args.device,
        "kv_cache_bytes": 1 << 30,
        "delta_cache_bytes": 4 << 30,
        "max_running": 64,
        "max_batch_tokens": 1024,
    }
    return Engine(load_settings(**(chosen | settings)), LocalDirDeltaSource(tasks))


async def one_request(engine: Engine, rid: str, task: str | None, prompt: tuple[int, ...], max_tokens: int) -> Timing:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async for chunk in engine.generate(GenerationRequest(rid, task, prompt, params)):
        last = time.perf_counter()
        first = first or last
        tokens += len(chunk.token_ids)
    return Timing(tokens, first, last, started)


async def closed_loop(
    engine: Engine, tasks: list[str | None], concurrency: int, waves: int, prompt: tuple[int, ...], max_tokens: int
) -> list[Timing]:
    async def client(c: int) -> list[Timing]:
        out = []
        for w in range(waves):
            i = w * concurrency + c
            out.append(await one_request(engine, f"c{c}w{w}", tasks[i % len(tasks)], prompt, max_tokens))
        return out

    return [t for ts in await asyncio.gather(*(client(c) for c in range(concurrency))) for t in ts]


async def prepare(engine: Engine, plans: dict[str, list[str | None]], args: argparse.Namespace) -> None:
    """Make every delta resident and warm the code paths (loads are reported, not timed)."""
    prompt = tuple(range(100, 100 + args.prompt_len))
    for tasks in plans.values():
        for task in {t for t in tasks if t is not None}:
            await engine.prefetch(task)
        await closed_loop(engine, tasks, 1, 1, prompt, 2)


async def run_rounds(
    engine: Engine,
    plans: dict[str, list[str | None]],
    args: argparse.Namespace,
    extra: Callable[[int], Awaitable[Result]] | None = None,
) -> list[Result]:
    """Every scenario of `plans` (then `extra(concurrency)`, when given) at each --concurrency, --rounds
    times interleaved (the CPU is shared and its load drifts); each result is shown as it lands."""
    rounds: list[Result] = []
    for c in args.concurrency:
        for _ in range(args.rounds):
            for scenario, tasks in plans.items():
                rounds.append(await run_deltas(engine, scenario, tasks, c, args))
                show(rounds[-1])
            if extra is not None:
                rounds.append(await extra(c))
                show(rounds[-1])
    return rounds


async def run_deltas(engine: Engine, name: str, tasks: list[str | None], c: int, args: argparse.Namespace) -> Result:
    prompt = tuple(range(100, 100 + args.prompt_len))
    started = time.perf_counter()
    timings = await closed_loop(engine, tasks, c, args.waves, prompt, args.max_tokens)
    return summarise(name, c, timings, time.perf_counter() - started)


def merged_weights(
    engine: Engine, mapping: dict[str, Path], args: argparse.Namespace
) -> dict[Path, dict[str, torch.Tensor]]:
    """W_base + reconstructed delta of every distinct artifact, kept in host memory for the swap baseline."""
    from compressor import load_artifact

    base_state = load_state_dict(args.base, engine.model.device, engine.model.dtype)
    return {src: load_artifact(src, args.base).merged_state_dict(base_state) for src in set(mapping.values())}


async def run_swap(
    engine: Engine,
    merged: dict[Path, dict[str, torch.Tensor]],
    mapping: dict[str, Path],
    c: int,
    args: argparse.Namespace,
) -> Result:
    """Merged full weights per task, swapped into the resident model per same-task group of each wave."""
    tasks = list(mapping)
    prompt = tuple(range(100, 100 + args.prompt_len))
    base_state = {name: t.clone() for name, t in engine.model.weights.items()}
    started = time.perf_counter()
    timings: list[Timing] = []
    for w in range(args.waves):
        wave = [tasks[(w * c + i) % len(tasks)] for i in range(c)]
        for task in dict.fromkeys(wave):
            _swap_in(engine, merged[mapping[task]])
            group: list[str | None] = [None] * wave.count(task)
            timings += await closed_loop(engine, group, len(group), 1, prompt, args.max_tokens)
    seconds = time.perf_counter() - started
    _swap_in(engine, base_state)
    return summarise("swap16", c, timings, seconds)


def _swap_in(engine: Engine, weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in engine.model.weights.items():
        tensor.copy_(weights[name])


def ratios(results: list[Result]) -> dict[str, float]:
    by = {(r.scenario, r.concurrency): r.tokens_per_s for r in results}
    out = {}
    for (scenario, c), value in by.items():
        if scenario != "base" and ("base", c) in by:
            out[f"{scenario}/base@{c}"] = round(value / by[("base", c)], 3)
        if scenario == "mix16" and ("swap16", c) in by:
            out[f"mix16/swap16@{c}"] = round(value / by[("swap16", c)], 3)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = ["scenarios interleaved per concurrency, best of --rounds rounds (the CPU is shared and its load drifts)"]
    if args.tasks_dir is None:
        artifacts, compress_s = synthetic_artifacts(args.base, args.distinct, args.ratio)
        notes.append(
            f"synthetic deltas: {args.distinct} random fine-tunes, ImPart CR {args.ratio:g}, reused round-robin"
        )
    else:
        artifacts, compress_s = args.tasks_dir, []
    folder, mapping = task_folder(artifacts, 16)
    names = list(mapping)
    engine = make_engine(args, folder)
    await engine.start()
    wanted = args.scenarios.split(",")
    plans = {
        k: v for k, v in {"base": [None], "one": names[:1], "mix4": names[:4], "mix16": names}.items() if k in wanted
    }
    await prepare(engine, plans, args)
    merged = merged_weights(engine, mapping, args) if "swap16" in wanted else {}

    async def swap(c: int) -> Result:
        return await run_swap(engine, merged, mapping, c, args)

    rounds = await run_rounds(engine, plans, args, swap if merged else None)
    stats = engine.stats()
    await engine.stop()
    return report(args, best_of(rounds), rounds, stats, artifacts, compress_s, notes)


def report(
    args: argparse.Namespace,
    results: list[Result],
    rounds: list[Result],
    stats: object,
    artifacts: Path,
    compress_s: list[float],
    notes: list[str],
) -> dict[str, object]:
    sizes = [p.stat().st_size for p in sorted(artifacts.glob("*.safetensors"))]
    return {
        "command": "python bench/serving.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
        },
        "config": {
            "base": str(args.base),
            "ratio": args.ratio,
            "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens,
            "waves": args.waves,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "threads": torch.get_num_threads(),
        },
        "deltas": {
            "artifact_bytes": sizes,
            "compress_seconds": compress_s,
            "resident_bytes_16_tasks": stats.resident_bytes,
            "loads": stats.delta_loads,  # type: ignore[attr-defined]
            "load_seconds_mean": stats.load_seconds / max(1, stats.delta_loads),
        },  # type: ignore[attr-defined]
        "results": [asdict(r) for r in results],
        "rounds": [asdict(r) for r in rounds],
        "ratios": ratios(results),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the serving benchmark and write its results."""
    run_benchmark(parse_args, main_async, argv)


if __name__ == "__main__":
    main()
