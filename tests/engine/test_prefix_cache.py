"""Automatic prefix caching: reused blocks change no output, never cross tasks, the base or versions,
survive memory pressure and preemption without touching a block in use, and never carry a failure's K/V.

Engine tests run the same workload on the tiny models with the cache off and on: greedy tokens must be
identical and logprobs within 1e-4 (a reused prefix is read back from the cache instead of attended
in-chunk, so the float sums run in another order). Scheduler tests check the block bookkeeping itself.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from server.engine.engine import Engine
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence
from server.engine.types import GenerationChunk, GenerationRequest, RequestFailedError
from server.observability.metrics import Metrics
from tests.engine.conftest import TASKS, collect, greedy, make_engine, output_ids
from tests.engine.test_isolation import _poison
from tests.engine.test_scheduler import make_scheduler, seq

BLOCK = 16
PREFIX_LENGTHS = (1, 15, 16, 17, 31, 32, 33, 48, 64)
"""Shared prefix lengths around block boundaries (block-aligned, aligned minus and plus one)."""
Outcome = tuple[list[int], list[float]]


def _prefix(length: int, salt: int) -> tuple[int, ...]:
    return tuple(3 + (salt * 37 + i * 11) % 250 for i in range(length))


def _requests(tag: str, tenants: tuple[str | None, ...], suffix: int) -> list[GenerationRequest]:
    """One request per (tenant, prefix length): the tenant's shared prefix, then `suffix` own tokens
    (suffix 0: the prompt is the prefix alone, so a repeat is covered by the cache to its last token)."""
    requests = []
    for t, tenant in enumerate(tenants):
        for length in PREFIX_LENGTHS:
            tail = tuple(200 + (suffix * 7 + j) % 40 for j in range(suffix))
            prompt = _prefix(length, salt=t) + tail
            requests.append(GenerationRequest(f"{tag}-{tenant}-{length}", tenant, prompt, greedy(6, logprobs=1)))
    return requests


def _outcome(chunks: list[GenerationChunk]) -> Outcome:
    return output_ids(chunks), [lp.logprob for c in chunks for lp in (c.logprobs or ())]


async def _waves(engine: Engine, waves: list[list[GenerationRequest]]) -> dict[str, Outcome]:
    """Each wave's requests concurrently (one mixed batch), the waves one after the other."""
    results: dict[str, Outcome] = {}
    for wave in waves:
        done = await asyncio.gather(*(collect(engine, r) for r in wave))
        results.update({r.request_id: _outcome(c) for r, c in zip(wave, done)})
    return results


async def _run(
    base: Path, tasks: Path, waves: list[list[GenerationRequest]], **settings: object
) -> tuple[dict[str, Outcome], Engine]:
    engine = make_engine(base, tasks, **({"kv_cache_bytes": 4 << 20, "kv_block_size": BLOCK} | settings))
    await engine.start()
    try:
        return await _waves(engine, waves), engine
    finally:
        await engine.stop(timeout=1.0)


def _assert_same(off: dict[str, Outcome], on: dict[str, Outcome]) -> None:
    assert off.keys() == on.keys()
    for request_id, (tokens, logprobs) in off.items():
        assert on[request_id][0] == tokens, f"{request_id}: tokens differ with the prefix cache"
        assert torch.allclose(torch.tensor(on[request_id][1]), torch.tensor(logprobs), atol=1e-4), request_id


@pytest.mark.parametrize("max_batch_tokens", [512, 24], ids=["whole-prefill", "chunked-prefill"])
async def test_greedy_tokens_and_logprobs_equal_with_the_cache_on_and_off(
    tiny_model: Path, tiny_tasks: Path, max_batch_tokens: int
) -> None:
    """Base and three tasks in mixed batches: a first wave fills the cache, a second shares the prefixes
    with other suffixes, a third repeats the first wave's prompts whole."""
    tenants = (None, *TASKS[:3])
    waves = [_requests("fill", tenants, 5), _requests("share", tenants, 9), _requests("repeat", tenants, 5)]
    off, off_engine = await _run(tiny_model, tiny_tasks, waves, prefix_cache=False, max_batch_tokens=max_batch_tokens)
    on, on_engine = await _run(tiny_model, tiny_tasks, waves, max_batch_tokens=max_batch_tokens)
    _assert_same(off, on)
    assert off_engine.stats().prefix_cache_hit_tokens == 0 and off_engine.stats().prefix_cache_blocks == 0
    stats = on_engine.stats()
    # the repeat wave alone reuses every full block before each prompt's last token
    repeat = sum((len(r.prompt_token_ids) - 1) // BLOCK * BLOCK for r in waves[2])
    assert stats.prefix_cache_hit_tokens >= repeat > 0
    assert stats.prefix_cache_hit_rate == stats.prefix_cache_hit_tokens / stats.prefix_cache_prompt_tokens


async def test_a_prefix_is_never_reused_across_tasks_the_base_or_versions(
    tiny_model: Path, tiny_tasks: Path, tmp_path: Path
) -> None:
    """The same 48-token prompt under alpha, beta, the base, then a re-published alpha: 0 tokens
    reused; alpha's new version again: its own blocks are reused (the counter does count)."""
    for name in ("alpha", "beta"):
        shutil.copyfile(tiny_tasks / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    prompt = _prefix(48, salt=9)
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20, kv_block_size=BLOCK)
    reference = make_engine(tiny_model, tiny_tasks, kv_cache_bytes=4 << 20, prefix_cache=False)
    await engine.start()
    await reference.start()
    try:
        for i, task in enumerate(("alpha", "beta", None, "alpha-v2")):
            if task == "alpha-v2":
                shutil.copyfile(tiny_tasks / "gamma.safetensors", tmp_path / "alpha.safetensors")
            served = "alpha" if task == "alpha-v2" else task
            got = output_ids(await collect(engine, GenerationRequest(f"r{i}", served, prompt, greedy(8))))
            want_task = "gamma" if task == "alpha-v2" else task
            want = output_ids(await collect(reference, GenerationRequest(f"w{i}", want_task, prompt, greedy(8))))
            assert got == want, f"{task}: output differs from an engine without a prefix cache"
            assert engine.stats().prefix_cache_hit_tokens == 0, f"{task} reused another key's blocks"
        await collect(engine, GenerationRequest("again", "alpha", prompt, greedy(8)))
        assert engine.stats().prefix_cache_hit_tokens == 32  # two full blocks before the last token
        metrics = Metrics()
        metrics.watch_engine(engine.stats)
        text = metrics.render().decode()
        assert "deltaserve_engine_prefix_cache_hit_tokens_total 32.0" in text
        assert "deltaserve_engine_prefix_cache_prompt_tokens_total 240.0" in text
        assert "deltaserve_engine_prefix_cache_hit_rate 0.1333" in text
    finally:
        await engine.stop(timeout=1.0)
        await reference.stop(timeout=1.0)


async def test_memory_pressure_evicts_and_preempts_without_changing_outputs(tiny_model: Path, tiny_tasks: Path) -> None:
    """24 blocks for 16 concurrent requests of two tenants sharing prefixes: idle cached blocks are
    evicted, running sequences are preempted and recomputed (reusing their cached blocks), and every
    output equals the cache-off run under the same budget."""
    tenants = (None, "alpha")
    waves = [
        [
            GenerationRequest(
                f"p{i}", tenants[i % 2], _prefix(40, salt=i % 2) + (100 + i,) * (1 + i % 5), greedy(40, logprobs=1)
            )
            for i in range(16)
        ]
    ]
    tiny = {"kv_cache_bytes": 24 * 8192, "max_batch_tokens": 64}
    off, _ = await _run(tiny_model, tiny_tasks, waves, prefix_cache=False, **tiny)
    on, engine = await _run(tiny_model, tiny_tasks, waves, **tiny)
    _assert_same(off, on)
    stats = engine.stats()
    admitted = sum(len(r.prompt_token_ids) for r in waves[0])
    assert stats.prefix_cache_prompt_tokens > admitted, "no sequence was preempted and re-admitted"
    assert stats.prefix_cache_hit_tokens > 0 and stats.prefix_cache_evictions > 0
    assert stats.kv_blocks_used == 0


async def test_a_failed_requests_blocks_are_never_reused(tiny_model: Path, tiny_tasks: Path, tmp_path: Path) -> None:
    """A task whose resident delta turns every row NaN fails its requests; none of its blocks is
    published, so the same prompt again reuses nothing, while a healthy task's blocks are reused."""
    shutil.copyfile(tiny_tasks / "alpha.safetensors", tmp_path / "poison.safetensors")
    shutil.copyfile(tiny_tasks / "alpha.safetensors", tmp_path / "alpha.safetensors")
    engine = make_engine(tiny_model, tmp_path, kv_cache_bytes=4 << 20, kv_block_size=BLOCK)
    _poison(engine, "poison", dense={"model.layers.0.input_layernorm.weight": torch.full((64,), torch.nan)})
    await engine.start()
    prompt = _prefix(40, salt=3)
    try:
        for i in range(2):
            with pytest.raises(RequestFailedError):
                await collect(engine, GenerationRequest(f"p{i}", "poison", prompt, greedy(4)))
        stats = engine.stats()
        assert stats.failed_requests == 2 and stats.prefix_cache_blocks == 0 and stats.prefix_cache_hit_tokens == 0
        first = output_ids(await collect(engine, GenerationRequest("a0", "alpha", prompt, greedy(4))))
        again = output_ids(await collect(engine, GenerationRequest("a1", "alpha", prompt, greedy(4))))
        assert first == again and engine.stats().prefix_cache_hit_tokens == 32
    finally:
        await engine.stop(timeout=1.0)


def _simulate_step(s: Scheduler, shadow: dict[int, tuple[object, int]]) -> None:
    """One step in which 'computing' a token writes (its chain key, token id) into its slot: every chunk
    first checks that its context slots still hold its own tokens, i.e. no block it uses was overwritten."""
    plan = s.schedule()
    for c in plan.chunks:
        key = (c.seq.task, c.seq.ref.sha256 if c.seq.ref else None)
        slots = s.kv.token_slots(c.seq.blocks, c.start + c.num_tokens).tolist()
        for pos in range(c.start):
            assert shadow.get(slots[pos]) == (key, c.seq.token_at(pos)), "a block in use was overwritten"
        for pos in range(c.start, c.start + c.num_tokens):
            shadow[slots[pos]] = (key, c.seq.token_at(pos))
        c.seq.num_computed += c.num_tokens
    for c in plan.chunks:
        if c.samples:
            s.publish(c.seq)
            c.seq.output.append(7)
            if len(c.seq.output) >= c.seq.request.params.max_tokens:
                s.finish(c.seq)


def _check_refcounts(s: Scheduler) -> int:
    """Every held block counts exactly its holders and is neither free nor idle; the most holders of one."""
    holders: dict[int, int] = {}
    for running in s.running:
        for block in running.blocks:
            holders[block] = holders.get(block, 0) + 1
    for block, count in holders.items():
        assert s.kv._refs[block] == count and block not in s.kv._idle and block not in s.kv._free
        assert count == 1 or block in s.kv._hash_of, "an unpublished block is shared"
    return max(holders.values(), default=0)


def test_eviction_never_frees_or_overwrites_a_block_in_use() -> None:
    """12 blocks of 4 tokens, 30 sequences of three keys sharing 9-token prefixes: blocks are shared,
    evicted and preempted all along, yet no running sequence's context is ever overwritten."""
    s = make_scheduler(blocks=12, max_running=6, budget=16)
    shadow: dict[int, tuple[object, int]] = {}
    items = [_seq(("a", "b", None)[i % 3], tuple(range(9)) + (50 + i,), 3 + i % 4) for i in range(30)]
    for item in items:
        s.add(item)
    shared = 0
    for _ in range(400):
        if not s.has_work():
            break
        _simulate_step(s, shadow)
        shared = max(shared, _check_refcounts(s))
    assert shared > 1, "no block was ever shared"
    assert all(len(item.output) == item.request.params.max_tokens for item in items)
    assert s.prefix.hit_tokens > 0 and s.kv.evictions > 0 and s.kv.used_blocks == 0


def test_a_failed_sequence_drops_its_published_blocks() -> None:
    """Finished normally, a sequence leaves its blocks cached for the next one; failed, it leaves none."""
    s = make_scheduler(blocks=16)
    shadow: dict[int, tuple[object, int]] = {}
    for failed, expected_hits in ((True, 0), (False, 8)):
        first = seq(None, prompt=10, max_tokens=5)
        s.add(first)
        while len(first.output) < 2:
            _simulate_step(s, shadow)
        assert s.kv.cached_blocks == 2
        s.finish(first, failed=failed)
        before = s.prefix.hit_tokens
        second = seq(None, prompt=10, max_tokens=2)
        s.add(second)
        _simulate_step(s, shadow)
        assert s.prefix.hit_tokens - before == expected_hits
        s.finish(second, failed=True)
        assert s.kv.cached_blocks == 0


def _seq(task: str | None, prompt: tuple[int, ...], max_tokens: int) -> Sequence:
    item = seq(task, max_tokens=max_tokens)
    item.request = replace(item.request, prompt_token_ids=prompt)
    return item
