"""One request's fault ends that request only: the step, and every other tenant's stream, go on unchanged.

Publishing refuses artifacts with non-finite or oversized values, so the poisons here are put into
resident deltas directly, as a fault in memory would: a NaN norm delta whose rows turn to NaN (the K/V
they write to the cache too), and factors that do not fit the base, so the forward itself raises. And
sampling parameters at the edge of what the API accepts.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
import torch

import kernels
from server.engine.engine import Engine
from server.engine.types import GenerationRequest, RequestFailedError, SamplingParams
from server.model.deltas import ResidentDelta
from server.registry import TaskVersion
from tests.engine.conftest import TASKS, collect, greedy, make_engine, output_ids

STREAMS = 16


def _poison(
    engine: Engine, task: str, factors: dict[str, object] | None = None, dense: dict[str, torch.Tensor] | None = None
) -> None:
    """Before `engine` starts: every load of `task` overwrites some tensors of the unpacked resident delta."""
    unpack = engine._unpack

    def poisoned(ref: TaskVersion, data: bytes) -> ResidentDelta:
        delta = unpack(ref, data)
        if ref.task == task:
            delta.factors.update(factors or {})  # type: ignore[attr-defined]
            delta.dense.update(dense or {})  # type: ignore[attr-defined]
        return delta

    engine._unpack = poisoned  # type: ignore[method-assign]


@pytest.fixture()
def tasks_with_poison(tiny_tasks: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "tasks"
    shutil.copytree(tiny_tasks, folder)
    shutil.copyfile(tiny_tasks / "alpha.safetensors", folder / "poison.safetensors")
    return folder


def _streams() -> list[GenerationRequest]:
    """16 requests over the four tasks and the base, prompts of different lengths."""
    tasks = (*TASKS, None)
    return [
        GenerationRequest(f"s{i}", tasks[i % len(tasks)], tuple(range(3 + i, 9 + 2 * i)), greedy(20))
        for i in range(STREAMS)
    ]


async def _run_streams(engine: Engine, poisons: list[GenerationRequest]) -> tuple[list, list]:
    """Poisons first (they take the first KV blocks), then the 16 streams while the poisons run."""
    poisoned = [asyncio.create_task(collect(engine, p)) for p in poisons]
    await asyncio.sleep(0)
    streams = await asyncio.gather(*(collect(engine, r) for r in _streams()), return_exceptions=True)
    poison_results = await asyncio.gather(*poisoned, return_exceptions=True)
    return list(streams), list(poison_results)


async def test_a_poisoned_task_fails_alone_among_16_live_streams(tiny_model: Path, tasks_with_poison: Path) -> None:
    reference = make_engine(tiny_model, tasks_with_poison, kv_cache_bytes=4 << 20, max_batch_tokens=64)
    await reference.start()
    try:
        clean, _ = await _run_streams(reference, [])
    finally:
        await reference.stop(timeout=1.0)
    engine = make_engine(tiny_model, tasks_with_poison, kv_cache_bytes=4 << 20, max_batch_tokens=64)
    _poison(engine, "poison", dense={"model.layers.0.input_layernorm.weight": torch.full((64,), torch.nan)})
    await engine.start()
    try:
        # alone first: it takes the first KV blocks (slot 0 among them) and fills them with NaN K/V
        first = await asyncio.gather(
            collect(engine, GenerationRequest("p0", "poison", tuple(range(40, 70)), greedy(20))), return_exceptions=True
        )
        poisons = [
            GenerationRequest("p-greedy", "poison", tuple(range(40, 70)), greedy(20)),
            GenerationRequest(
                "p-sampled", "poison", tuple(range(5, 12)), SamplingParams(temperature=1.0, max_tokens=20, seed=1)
            ),
        ]
        streams, poison_results = await _run_streams(engine, poisons)
        again, _ = await _run_streams(engine, [])
    finally:
        await engine.stop(timeout=1.0)
    assert all(isinstance(r, RequestFailedError) for r in first + poison_results), (first, poison_results)
    assert engine.stats().failed_requests == 3
    assert "non-finite" in str(poison_results[0])
    for before, during, after in zip(clean, streams, again):
        assert not isinstance(during, BaseException), during
        assert not isinstance(after, BaseException), after
        assert output_ids(during) == output_ids(before) == output_ids(after)
        assert during[-1].finish_reason == "length"


async def test_a_delta_that_breaks_the_forward_fails_only_its_requests(tiny_model: Path, tiny_tasks: Path) -> None:
    """A resident delta whose q_proj factors do not fit the base: the joint forward raises, the runner
    re-runs by task and fails that task's request only."""
    engine = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=4 << 20)
    wrong = kernels.pack_factors(torch.ones(3, 2), torch.ones(2), torch.ones(5, 2))  # [3 x 5], not [64 x 64]
    _poison(engine, "beta", factors={"model.layers.1.self_attn.q_proj.weight": wrong})
    await engine.start()
    try:
        requests = _streams()
        results = await asyncio.gather(*(collect(engine, r) for r in requests), return_exceptions=True)
    finally:
        await engine.stop(timeout=1.0)
    for request, result in zip(requests, results):
        if request.task == "beta":
            assert isinstance(result, RequestFailedError), result
        else:
            assert not isinstance(result, BaseException), result
            assert result[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300, max_tokens=8, ignore_eos=True),
        SamplingParams(top_p=1e-300, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=2.0, top_p=5e-324, top_k=2, max_tokens=8, ignore_eos=True),
    ],
)
async def test_edge_sampling_parameters_are_greedy_and_harm_no_one(tiny_engine: Engine, params: SamplingParams) -> None:
    prompt = tuple(range(10, 20))
    expected = output_ids(await collect(tiny_engine, GenerationRequest("g", None, prompt, greedy(8))))
    edge, other = await asyncio.gather(
        collect(tiny_engine, GenerationRequest("edge", None, prompt, params)),
        collect(tiny_engine, GenerationRequest("other", None, prompt, greedy(8))),
    )
    assert output_ids(edge) == expected == output_ids(other)
