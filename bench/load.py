"""Open-loop load test of a deltaserve server over HTTP on loopback.

Arrivals are Poisson at --rate requests/s (open loop: a request is sent at its time whatever the
server's state); each names a task drawn from a Zipf law over --tasks tasks, more than the delta
cache holds, with mixed prompt and output lengths. Two phases run on the same arrival times: `base`
(no task) and `tasks` (the Zipf mix); the report gives the tasks phase against the base phase as
ratios. Measured: throughput, time to first token and inter-token latency p50/p99, errors, and the
delta cache hit rate (from the engine's counters) against the hit rate predicted for the cache size.

    .venv/bin/python bench/load.py --quick          # spawns a tiny-model server, ~1 minute
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --admin-key KEY --rate 4 --duration 60

Results: bench/results/load.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)  # run as a script: bench/kernels.py would shadow the `kernels` package

from bench.measure import RESULTS  # noqa: E402  (importable only once the root leads sys.path, above)

WORDS = ("delta", "task", "model", "serve", "batch", "token", "cache", "sparse", "vector", "layer", "rank")


@dataclass(frozen=True)
class LoadConfig:
    rate: float
    """Mean arrivals per second (Poisson)."""
    duration: float
    """Seconds of arrivals per phase."""
    zipf_s: float
    prompt_words: tuple[int, int]
    max_tokens: tuple[int, int]
    seed: int


@dataclass(frozen=True)
class Planned:
    at: float
    """Seconds after the phase starts."""
    task: str | None
    model: str
    """The `model` field: the task, or the base's name."""
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    task: str | None
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive content chunks (one token each, as the engine streams)."""
    completion_tokens: int = 0


def zipf_weights(n: int, s: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k^s, k = 1..n."""
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def plan_phase(config: LoadConfig, tasks: list[str] | None, base_name: str) -> list[Planned]:
    """Poisson arrival times over the duration; tasks drawn by Zipf rank (None: the base alone).

    Arrivals, prompts and lengths come from their own seeded streams, so a base phase and a tasks
    phase with the same config send the same requests at the same times; only the task differs."""
    arrivals, shapes, picks = (random.Random(config.seed + k) for k in range(3))
    cumulative = np.cumsum(zipf_weights(len(tasks), config.zipf_s)) if tasks else None
    plan, now = [], arrivals.expovariate(config.rate)
    while now < config.duration:
        task = tasks[min(int(np.searchsorted(cumulative, picks.random())), len(tasks) - 1)] if tasks else None
        words = " ".join(shapes.choice(WORDS) for _ in range(shapes.randint(*config.prompt_words)))
        plan.append(Planned(now, task, task or base_name, words, shapes.randint(*config.max_tokens)))
        now += arrivals.expovariate(config.rate)
    return plan


async def send(client: httpx.AsyncClient, item: Planned) -> Outcome:
    """One streamed chat request; times the first content chunk and the gaps between chunks."""
    outcome, started = Outcome(item.task), time.perf_counter()
    body = {
        "model": item.model,
        "messages": [{"role": "user", "content": item.prompt}],
        "max_tokens": item.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"X-Task": item.task} if item.task else {}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as reply:
            if reply.status_code != 200:
                outcome.error = f"http {reply.status_code}"
                return outcome
            await _read_stream(reply, outcome, started)
    except httpx.HTTPError as exc:
        outcome.error = type(exc).__name__
        return outcome
    outcome.latency, outcome.ok = time.perf_counter() - started, outcome.error is None
    return outcome


async def _read_stream(reply: httpx.Response, outcome: Outcome, started: float) -> None:
    last = None
    async for line in reply.aiter_lines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            outcome.error = event["error"].get("code") or "stream error"
        if event.get("usage"):
            outcome.completion_tokens = event["usage"]["completion_tokens"]
        if any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
            now = time.perf_counter()
            if last is None:
                outcome.ttft = now - started
            else:
                outcome.gaps.append(now - last)
            last = now


async def run_phase(url: str, plan: list[Planned], label: str, key: str | None) -> tuple[list[Outcome], float]:
    """Send every planned request at its time (open loop); returns the outcomes and the wall time."""
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        bar = tqdm(total=len(plan), desc=f"load {label}", unit="req")
        start, failed = time.perf_counter(), [0]

        async def fire(item: Planned) -> Outcome:
            await asyncio.sleep(max(0.0, start + item.at - time.perf_counter()))
            outcome = await send(client, item)
            failed[0] += not outcome.ok
            bar.update(1)
            bar.set_postfix(errors=failed[0], in_flight=len(plan) - bar.n)
            return outcome

        outcomes = await asyncio.gather(*(fire(item) for item in plan))
        bar.close()
        return list(outcomes), time.perf_counter() - start


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


def summarize(outcomes: list[Outcome], wall: float) -> dict[str, object]:
    done = [o for o in outcomes if o.ok]
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.error or "unknown"] = errors.get(o.error or "unknown", 0) + 1
    tokens = sum(o.completion_tokens for o in done)
    return {
        "requests": len(outcomes),
        "succeeded": len(done),
        "errors": errors,
        "wall_s": wall,
        "requests_per_s": len(done) / wall,
        "output_tokens_per_s": tokens / wall,
        "output_tokens": tokens,
        "ttft_s": percentiles([o.ttft for o in done if o.ttft is not None]),
        "inter_token_s": percentiles([g for o in done for g in o.gaps]),
        "latency_s": percentiles([o.latency for o in done if o.latency is not None]),
    }


def engine_stats(url: str, admin_key: str | None) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    reply = httpx.get(f"{url}/admin/v1/stats", headers=headers, timeout=30)
    reply.raise_for_status()
    return reply.json()


def cache_figures(before: dict, after: dict) -> dict[str, float | int]:
    """The delta cache's work during one phase, from the engine's counters before and after it."""
    hits = int(after["delta_hits"]) - int(before["delta_hits"])
    misses = int(after["delta_misses"]) - int(before["delta_misses"])
    return {
        "hits": hits,
        "misses": misses,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "loads": int(after["delta_loads"]) - int(before["delta_loads"]),
        "evictions": int(after["evictions"]) - int(before["evictions"]),
        "load_seconds": float(after["load_seconds"]) - float(before["load_seconds"]),
    }


def predicted_hit_rate(n_tasks: int, zipf_s: float, resident: int) -> float:
    """Upper bound for a cache holding the `resident` most popular tasks: their share of requests."""
    return float(zipf_weights(n_tasks, zipf_s)[:resident].sum())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_artifacts(base: Path, folder: Path, count: int, ratio: float) -> list[Path]:
    """`count` distinct artifacts: synthetic fine-tunes of the base, each compressed with ImPart."""
    import compressor
    from server.model.synthetic import write_synthetic_finetune

    out = []
    for index in tqdm(range(count), desc="make tasks", unit="task"):
        tuned = write_synthetic_finetune(base, folder / f"ft-{index}", seed=100 + index, scale=0.3)
        path = folder / f"task-{index:03d}.safetensors"
        compressor.compress(base, tuned, path, method="impart", ratio=ratio, seed=index)
        out.append(path)
    return out


@contextmanager
def spawned_server(
    base: Path, work: Path, delta_cache_bytes: int, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    """A `deltaserve serve` process on the tiny base, on loopback; stopped (SIGTERM) afterwards."""
    port = free_port()
    env = os.environ | {
        "DELTASERVE_BASE_MODEL": str(base),
        "DELTASERVE_PORT": str(port),
        "DELTASERVE_HOST": "127.0.0.1",
        "DELTASERVE_REGISTRY_DIR": str(work / "registry"),
        "DELTASERVE_WORK_DIR": str(work / "work"),
        "DELTASERVE_DELTA_CACHE_BYTES": str(delta_cache_bytes),
        "DELTASERVE_LOG_LEVEL": "warning",
        "DELTASERVE_SHUTDOWN_TIMEOUT": "5",
        **(extra_env or {}),
    }
    log = (work / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, work / "server.log")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, deadline_s: float = 180.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"server not ready after {deadline_s}s")


def publish(url: str, artifacts: list[Path], admin_key: str | None) -> list[str]:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    names = []
    with httpx.Client(base_url=url, headers=headers, timeout=120) as admin:
        for path in artifacts:
            reply = admin.put(f"/admin/v1/tasks/{path.stem}/artifact", content=path.read_bytes())
            reply.raise_for_status()
            names.append(path.stem)
    return names


def served_models(url: str, key: str | None) -> tuple[str, list[str]]:
    """(base name, task names) as GET /v1/models lists them."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    cards = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
    return cards[0]["id"], [card["id"] for card in cards[1:]]


def resident_bytes_per_task(url: str, task: str, key: str | None) -> int:
    """Resident size of one task's delta: the engine's resident bytes before and after warming it."""
    before = int(engine_stats(url, key)["resident_bytes"])
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    httpx.post(f"{url}/admin/v1/tasks/{task}/warm", headers=headers, timeout=120).raise_for_status()
    return max(1, int(engine_stats(url, key)["resident_bytes"]) - before)


def measure(url: str, config: LoadConfig, key: str | None, delta_cache_bytes: int | None) -> dict[str, object]:
    """Both phases on the same arrival times, their summaries, and tasks/base ratios."""
    base_name, tasks = served_models(url, key)
    if not tasks:
        raise SystemExit("the server has no tasks; publish some (or run with --quick to spawn one)")
    per_task = resident_bytes_per_task(url, tasks[0], key)
    resident = len(tasks) if delta_cache_bytes is None else min(len(tasks), delta_cache_bytes // per_task)
    phases = {}
    for label, names in (("base", None), ("tasks", tasks)):
        before = engine_stats(url, key)
        outcomes, wall = asyncio.run(run_phase(url, plan_phase(config, names, base_name), label, key))
        phases[label] = {**summarize(outcomes, wall), "delta_cache": cache_figures(before, engine_stats(url, key))}
    prediction = {
        "resident_tasks": resident,
        "resident_bytes_per_task": per_task,
        "hit_rate_upper_bound": predicted_hit_rate(len(tasks), config.zipf_s, resident),
    }
    return {
        "config": asdict(config),
        "tasks": len(tasks),
        "prediction": prediction,
        "phases": phases,
        "tasks_vs_base": ratios(phases["tasks"], phases["base"]),
    }


def ratios(tasks: dict, base: dict) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "output_tokens_per_s": ratio(tasks["output_tokens_per_s"], base["output_tokens_per_s"]),
        "ttft_p50": ratio(tasks["ttft_s"]["p50"], base["ttft_s"]["p50"]),
        "ttft_p99": ratio(tasks["ttft_s"]["p99"], base["ttft_s"]["p99"]),
        "inter_token_p50": ratio(tasks["inter_token_s"]["p50"], base["inter_token_s"]["p50"]),
        "inter_token_p99": ratio(tasks["inter_token_s"]["p99"], base["inter_token_s"]["p99"]),
    }


def print_report(result: dict) -> None:
    for label, phase in result["phases"].items():
        ttft, itl, cache = phase["ttft_s"], phase["inter_token_s"], phase["delta_cache"]
        print(
            f"{label:>5}: {phase['succeeded']}/{phase['requests']} ok, errors {phase['errors']}, "
            f"{phase['output_tokens_per_s']:.1f} tok/s, TTFT p50 {_ms(ttft['p50'])} p99 {_ms(ttft['p99'])}, "
            f"ITL p50 {_ms(itl['p50'])} p99 {_ms(itl['p99'])}, cache hit rate {cache['hit_rate']:.2f} "
            f"({cache['loads']} loads, {cache['evictions']} evictions)"
        )
    pred = result["prediction"]
    print(
        f"delta cache holds {pred['resident_tasks']} of {result['tasks']} tasks: hit rate at most "
        f"{pred['hit_rate_upper_bound']:.2f} (the {pred['resident_tasks']} most popular tasks' share)"
    )
    print("tasks / base: " + ", ".join(f"{k} {v:.2f}" for k, v in result["tasks_vs_base"].items() if v is not None))


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}ms"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an running server (default: spawn one on the tiny base)")
    parser.add_argument("--admin-key", default=None, help="admin key of --url (stats, warm; also used for /v1)")
    parser.add_argument("--quick", action="store_true", help="small, short run (~1 minute on 2 CPU cores)")
    parser.add_argument("--tasks", type=int, default=24, help="tasks to publish when spawning a server")
    parser.add_argument("--resident", type=int, default=6, help="tasks the spawned server's delta cache holds")
    parser.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per phase")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the task mix")
    parser.add_argument("--ratio", type=float, default=8.0, help="compression ratio of the spawned tasks")
    parser.add_argument("--delta-cache-bytes", type=int, default=None, help="cache size of --url, for the prediction")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks, args.resident, args.rate, args.duration = 8, 3, 4.0, 8.0
    return args


def spawn_and_measure(args: argparse.Namespace, config: LoadConfig) -> dict[str, object]:
    """Provision the tiny base, make the tasks, size the delta cache to hold --resident of them, measure."""
    from server.model.synthetic import write_tiny

    with tempfile.TemporaryDirectory(prefix="deltaserve-load-") as tmp:
        work = Path(tmp)
        base = write_tiny(work / "tiny", seed=0)
        artifacts = make_artifacts(base, work / "artifacts", args.tasks, args.ratio)
        probe_bytes = _resident_probe(base, work, artifacts[0])
        cache_bytes = probe_bytes * args.resident + probe_bytes // 2
        with spawned_server(base, work, cache_bytes) as url:
            publish(url, artifacts, None)
            result = measure(url, config, None, cache_bytes)
    result["server"] = {"spawned": True, "base": "tiny", "delta_cache_bytes": cache_bytes}
    return result


def _resident_probe(base: Path, work: Path, artifact: Path) -> int:
    """Resident bytes of one task's delta, unpacked the way the engine does it."""
    import torch

    from server.model.deltas import unpack_artifact

    return int(unpack_artifact("probe", artifact.read_bytes(), base, torch.device("cpu"), torch.float32).nbytes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = LoadConfig(
        rate=args.rate,
        duration=args.duration,
        zipf_s=args.zipf,
        prompt_words=(4, 48),
        max_tokens=(8, 48) if not args.quick else (8, 24),
        seed=args.seed,
    )
    if args.url:
        result = measure(args.url, config, args.admin_key, args.delta_cache_bytes)
        result["server"] = {"spawned": False, "url": args.url}
    else:
        result = spawn_and_measure(args, config)
    result["reproduce"] = "python bench/load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
