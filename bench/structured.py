"""Structured-output benchmark: tokens/s of a 16-row batch with every row grammar-constrained vs none.

One engine on the base (SmolLM2-135M by default), prefix cache off so both runs compute the same
prompts. Each run sends --rows requests at once (distinct --prompt-len token prompts, the same in
both runs), each decoding exactly --max-tokens tokens: free rows ignore EOS; constrained rows follow a
JSON schema whose shortest sentence is far longer than --max-tokens (an array of at least 40 objects),
so no row finishes early and both runs keep the batch full. A warm-up run of each comes first; then
--rounds timed runs of each, alternating (free, constrained, free, ...), so that the shared machine's
load falls on both alike. The ratio constrained / free of each round, and of the best runs, is what
constrained decoding costs (mask, matcher, the masked row's sampling).

    .venv/bin/python bench/structured.py --threads 1
Results: bench/results/structured.json (--out); docs/engine.md quotes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
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
    summarise,
)
from server.config import load_settings
from server.engine.engine import Engine
from server.engine.sources import LocalDirDeltaSource
from server.engine.types import GenerationRequest, GrammarSpec, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 40,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 16},
                    "qty": {"type": "integer"},
                    "unit": {"enum": ["kg", "l", "pcs"]},
                    "fragile": {"type": "boolean"},
                },
                "required": ["name", "qty", "unit", "fragile"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = bench_parser(__doc__)
    p.add_argument("--rows", type=int, default=16, help="requests in the batch")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens of each prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each row decodes")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each kind, alternating")
    add_engine_options(p, threads=1)
    add_out(p, "structured")
    return p.parse_args(argv)


async def run_batch(
    engine: Engine, name: str, prompts: list[tuple[int, ...]], args: argparse.Namespace, grammar: GrammarSpec | None
) -> Result:
    """Send every prompt at once; each row decodes args.max_tokens tokens (sampled, seeded)."""

    async def one(i: int, prompt: tuple[int, ...]) -> Timing:
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=args.max_tokens, ignore_eos=True, grammar=grammar)
        started, first, tokens = time.perf_counter(), 0.0, 0
        async for chunk in engine.generate(GenerationRequest(f"{name}-{i}-{started}", None, prompt, params)):
            tokens += len(chunk.token_ids)
            first = first or time.perf_counter()
            if chunk.finish_reason is not None and chunk.finish_reason != "length":
                raise RuntimeError(f"row {i} of {name} ended early ({chunk.finish_reason}); the batch would shrink")
        return Timing(tokens, first, time.perf_counter(), started)

    started = time.perf_counter()
    timings = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return summarise(name, len(prompts), list(timings), time.perf_counter() - started)


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    settings = load_settings(
        base_model=str(args.base),
        device=args.device,
        prefix_cache=False,
        torch_threads=args.threads,
        max_batch_tokens=max(512, args.rows * args.prompt_len),
    )
    engine = Engine(settings, LocalDirDeltaSource(Path("/nonexistent-tasks")))
    await engine.start()
    rng = random.Random(0)
    vocab = engine.config.vocab_size
    prompts = [tuple(rng.randrange(100, vocab) for _ in range(args.prompt_len)) for _ in range(args.rows)]
    grammar = GrammarSpec("json_schema", json.dumps(SCHEMA))
    try:
        await run_batch(engine, "warmup-free", prompts, args, None)
        await run_batch(engine, "warmup-constrained", prompts, args, grammar)
        rounds = [
            (
                await run_batch(engine, "free", prompts, args, None),
                await run_batch(engine, "constrained", prompts, args, grammar),
            )
            for _ in range(args.rounds)
        ]
    finally:
        await engine.stop(timeout=1.0)
    free, constrained = best_of([r for pair in rounds for r in pair])
    return {
        "settings": {
            **{k: (repo_path(v) if isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "machine": platform.machine(),
            "schema": SCHEMA,
        },
        "rounds": [[asdict(r) for r in pair] for pair in rounds],
        "ratios": {
            "constrained_over_free_per_round": [round(c.tokens_per_s / f.tokens_per_s, 3) for f, c in rounds],
            "constrained_over_free_best": round(constrained.tokens_per_s / free.tokens_per_s, 3),
            "free_tokens_per_s_best": free.tokens_per_s,
            "constrained_tokens_per_s_best": constrained.tokens_per_s,
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Run the structured-output benchmark and write its results."""
    run_benchmark(parse_args, main_async, argv)


if __name__ == "__main__":
    main()
