"""The Engine's contract (D) as the HTTP layer sees it: errors, aborts, stops, shutdown, deltas."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from server.engine.engine import Engine
from server.engine.types import (
    DeltaLoadError,
    EngineNotReadyError,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    SamplingParams,
    TaskNotFoundError,
)
from tests.engine.conftest import collect, greedy, make_engine, output_ids

PROMPT = (5, 17, 40, 99, 3)


async def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_errors_are_raised_before_anything_is_yielded(tiny_model: Path, tiny_engine: Engine) -> None:
    cases = [
        (GenerationRequest("a", "missing", PROMPT), TaskNotFoundError),
        (GenerationRequest("b", None, ()), InvalidRequestError),
        (GenerationRequest("c", None, (10**6,)), InvalidRequestError),
        (GenerationRequest("d", None, PROMPT, SamplingParams(top_p=0.0)), InvalidRequestError),
        (GenerationRequest("e", None, tuple(range(tiny_engine.max_model_len))), InvalidRequestError),
    ]
    for request, error in cases:
        with pytest.raises(error):
            await collect(tiny_engine, request)
    assert tiny_engine.stats().running == 0


async def test_not_ready_before_start(tiny_model: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, tmp_path)
    assert not engine.ready and engine.base_name == tiny_model.name and engine.max_model_len > 0
    with pytest.raises(EngineNotReadyError):
        await collect(engine, GenerationRequest("a", None, PROMPT))


async def test_max_tokens_ends_with_length_and_usage(tiny_engine: Engine) -> None:
    chunks = await collect(tiny_engine, GenerationRequest("a", None, PROMPT, greedy(7)))
    assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].completion_tokens == 7 and chunks[-1].prompt_tokens == len(PROMPT)
    assert "".join(c.text for c in chunks) == tiny_engine.tokenizer.decode(output_ids(chunks), skip_special_tokens=True)


async def test_stop_token_and_stop_string_end_with_stop(tiny_engine: Engine) -> None:
    free = output_ids(await collect(tiny_engine, GenerationRequest("a", None, PROMPT, greedy(12))))
    by_token = await collect(tiny_engine, GenerationRequest("b", None, PROMPT, greedy(12, stop_token_ids=(free[3],))))
    assert output_ids(by_token) == free[: free.index(free[3]) + 1] and by_token[-1].finish_reason == "stop"
    text = tiny_engine.tokenizer.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    by_text = await collect(tiny_engine, GenerationRequest("c", None, PROMPT, greedy(12, stop=(stop,))))
    assert by_text[-1].finish_reason == "stop"
    assert "".join(c.text for c in by_text) == text[: text.index(stop)]


async def test_abort_and_client_disconnect_free_kv_blocks(tiny_engine: Engine) -> None:
    stream = tiny_engine.generate(GenerationRequest("a", None, PROMPT, greedy(400)))
    await stream.__anext__()
    assert tiny_engine.stats().kv_blocks_used > 0
    await stream.aclose()
    await _wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0 and tiny_engine.stats().running == 0)
    got: list[str | None] = []

    async def consume() -> None:
        async for chunk in tiny_engine.generate(GenerationRequest("b", None, PROMPT, greedy(400))):
            got.append(chunk.finish_reason)
            if len(got) == 2:
                await tiny_engine.abort("b")

    await asyncio.wait_for(consume(), 10)
    assert got[-1] == "abort" and len(got) < 400
    await _wait_for(lambda: tiny_engine.stats().kv_blocks_used == 0)


async def test_queue_limit_raises_queue_full(tiny_model: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, tmp_path, max_running=1, max_queue=1, kv_cache_bytes=1 << 20)
    await engine.start()
    try:
        first = engine.generate(GenerationRequest("a", None, PROMPT, greedy(300)))
        await first.__anext__()
        second = engine.generate(GenerationRequest("b", None, PROMPT, greedy(300)))
        waiting = asyncio.ensure_future(second.__anext__())
        await _wait_for(lambda: engine.stats().queue_depth == 1)
        with pytest.raises(QueueFullError):
            await collect(engine, GenerationRequest("c", None, PROMPT, greedy(2)))
        waiting.cancel()
        await first.aclose()
    finally:
        await engine.stop(timeout=0.1)


async def test_stop_finishes_in_flight_then_aborts_the_rest(tiny_model: Path, tmp_path: Path) -> None:
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=2 << 20)
    await engine.start()
    short = asyncio.ensure_future(collect(engine, GenerationRequest("a", None, PROMPT, greedy(3))))
    long = asyncio.ensure_future(collect(engine, GenerationRequest("b", None, PROMPT, greedy(100_000))))
    # On a quiet machine the 3-token request can finish before the long one is admitted: then only the
    # long one is in flight at stop, and the assertions below still hold for both.
    await _wait_for(lambda: engine.stats().running == 2 or (short.done() and engine.stats().running == 1))
    await engine.stop(timeout=0.3)
    assert (await short)[-1].finish_reason == "length"
    assert (await long)[-1].finish_reason == "abort"
    assert not engine.ready


async def test_corrupt_artifact_raises_delta_load_error(tiny_model: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    data = bytearray((tiny_tasks / "alpha.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "broken.safetensors").write_bytes(bytes(data))
    engine = make_engine(tiny_model, tmp_path)
    await engine.start()
    try:
        with pytest.raises(DeltaLoadError):
            await collect(engine, GenerationRequest("a", "broken", PROMPT, greedy(2)))
        with pytest.raises(DeltaLoadError):
            await engine.prefetch("broken")
        with pytest.raises(TaskNotFoundError):
            await engine.prefetch("absent")
    finally:
        await engine.stop(timeout=0.1)


async def test_prefetch_counters_and_invalidate_reload_the_new_version(
    tiny_model: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    shutil.copyfile(tiny_tasks / "alpha.safetensors", tmp_path / "t.safetensors")
    engine = make_engine(tiny_model, tmp_path)
    await engine.start()
    try:
        await engine.prefetch("t")
        first = output_ids(await collect(engine, GenerationRequest("a", "t", PROMPT, greedy(8))))
        stats = engine.stats()
        assert stats.resident_tasks == ("t",) and stats.delta_hits == 1 and stats.delta_misses == 0
        assert stats.resident_bytes > 0 and stats.delta_loads == 1 and stats.load_seconds > 0
        shutil.copyfile(tiny_tasks / "beta.safetensors", tmp_path / "t.safetensors")
        engine.invalidate("t")
        assert engine.stats().resident_tasks == ()
        second = output_ids(await collect(engine, GenerationRequest("b", "t", PROMPT, greedy(8))))
        beta = output_ids(await collect(engine, GenerationRequest("c", None, PROMPT, greedy(8))))
    finally:
        await engine.stop(timeout=0.1)
    assert engine.stats().delta_misses == 1 and engine.stats().delta_loads == 2
    assert first != second and second != beta


async def test_seeded_requests_reproduce_across_batches(tiny_engine: Engine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=16, ignore_eos=True)
    alone = output_ids(await collect(tiny_engine, GenerationRequest("a", None, PROMPT, params)))
    together = await asyncio.gather(
        collect(tiny_engine, GenerationRequest("b", None, PROMPT, params)),
        collect(tiny_engine, GenerationRequest("c", None, PROMPT[:3], SamplingParams(temperature=1.0, max_tokens=20))),
    )
    assert output_ids(together[0]) == alone
