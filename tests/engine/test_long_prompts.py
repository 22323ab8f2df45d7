"""Prompts of every length up to the context, prefilled in chunks, alone or mixed with other work.

The chunk is DELTASERVE_MAX_BATCH_TOKENS (small here, so the sweep stays fast). A prompt longer than one
chunk spends whole steps on non-final chunks, which have no logit rows; those steps must run like any
other, and each prompt's greedy tokens must equal transformers' (the merged model's for a task).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from server.engine.engine import Engine
from server.engine.kv_cache import KVCache
from server.engine.types import GenerationRequest, InvalidRequestError
from server.model.attention import AttentionMeta, PrefillChunk
from server.model.deltas import StepDeltas, unpack_artifact
from server.model.llama import ForwardBatch, LlamaModel
from tests.engine.conftest import collect, greedy, hf_greedy, make_engine, merged_hf, output_ids

CHUNK = 16
CONTEXT = 512
"""The tiny model's max_position_embeddings; the KV budget below holds more, so this is the context."""
LENGTHS = (1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7, 200, CONTEXT - 4, CONTEXT - 1)
STEPS = 4


def _prompt(length: int, seed: int) -> tuple[int, ...]:
    return tuple(torch.randint(3, 400, (length,), generator=torch.Generator().manual_seed(seed)).tolist())


def _steps(length: int) -> int:
    return min(STEPS, CONTEXT - length)


@pytest.fixture(scope="module")
def references(tiny_model: Path, tiny_tasks: Path) -> dict[str | None, torch.nn.Module]:
    return {None: merged_hf(tiny_model, None), "alpha": merged_hf(tiny_model, tiny_tasks / "alpha.safetensors")}


@pytest.fixture()
async def engine(tiny_model: Path, tiny_tasks: Path) -> AsyncIterator[Engine]:
    engine = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=4 << 20, max_batch_tokens=CHUNK)
    await engine.start()
    assert engine.max_model_len == CONTEXT
    yield engine
    await engine.stop(timeout=1.0)


def _expected(references: dict[str | None, torch.nn.Module], task: str | None, prompt: tuple[int, ...]) -> list[int]:
    return hf_greedy(references[task], list(prompt), _steps(len(prompt)))[0]


@pytest.mark.parametrize("task", [None, "alpha"])
async def test_each_length_alone_matches_transformers(
    engine: Engine, references: dict[str | None, torch.nn.Module], task: str | None
) -> None:
    for length in LENGTHS:
        prompt = _prompt(length, seed=length)
        chunks = await collect(engine, GenerationRequest(f"{task}-{length}", task, prompt, greedy(_steps(length))))
        assert output_ids(chunks) == _expected(references, task, prompt), length
        assert chunks[-1].finish_reason == "length"
    assert engine.stats().steps > sum(-(-n // CHUNK) for n in LENGTHS)  # the long prompts took many steps


async def test_every_length_at_once_next_to_running_decodes(
    engine: Engine, references: dict[str | None, torch.nn.Module]
) -> None:
    """A long decode is running; then every length arrives at once, base and task rows interleaved."""
    decode = GenerationRequest("decode", "alpha", _prompt(9, seed=1), greedy(60))
    running = asyncio.create_task(collect(engine, decode))
    await asyncio.sleep(0.05)
    requests = [
        GenerationRequest(f"r{i}", ("alpha", None)[i % 2], _prompt(n, seed=100 + n), greedy(_steps(n)))
        for i, n in enumerate(LENGTHS)
    ]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    for request, chunks in zip(requests, results):
        expected = _expected(references, request.task, request.prompt_token_ids)
        assert output_ids(chunks) == expected, len(request.prompt_token_ids)
    assert output_ids(await running) == hf_greedy(references["alpha"], list(decode.prompt_token_ids), 60)[0]


async def test_a_prompt_that_fills_the_context_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await collect(engine, GenerationRequest("full", None, _prompt(CONTEXT, seed=3), greedy(1)))
    assert info.value.param == "prompt"
    chunks = await collect(engine, GenerationRequest("after", None, _prompt(CHUNK + 1, seed=4), greedy(2)))
    assert chunks[-1].finish_reason == "length"


def test_a_forward_with_no_logit_rows_returns_no_logits(tiny_model: Path, tiny_tasks: Path) -> None:
    """A non-final chunk of a task's prompt: its K/V is written, and the logits are [0, vocab]."""
    model = LlamaModel.from_dir(tiny_model)
    kv = KVCache(model.config, 1 << 20, CHUNK, torch.device("cpu"), torch.float32)
    slots = kv.token_slots(kv.allocate(1), CHUNK)
    meta = AttentionMeta(slots, None, (PrefillChunk(0, CHUNK, CHUNK, slots),))
    batch = ForwardBatch.of(list(_prompt(CHUNK, seed=5)), list(range(CHUNK)), [], meta, model.device)
    assert batch.logit_rows.dtype == torch.int64
    data = (tiny_tasks / "alpha.safetensors").read_bytes()
    resident = unpack_artifact("alpha", data, None, model.device, model.dtype)
    deltas = StepDeltas([resident], torch.zeros(CHUNK, dtype=torch.int64), batch.logit_rows, model.dtype)
    logits = model.forward(batch, kv.layers, deltas)
    assert logits.shape == (0, model.config.vocab_size) and logits.dtype == torch.float32
    assert kv.layers[0].key[slots].abs().sum() > 0
