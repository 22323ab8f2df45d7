"""Scheduler and delta cache without a model: joins, chunking, pins, eviction, fairness."""

from __future__ import annotations

import hashlib
import threading
import time

import torch

from server.engine.delta_cache import DeltaCache, DeltaState
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.kv_cache import KVCache
from server.engine.scheduler import ChunkResult, Scheduler, StepOutput, StepPlan
from server.engine.sequence import Sequence
from server.engine.types import GenerationRequest, RequestFailedError, SamplingParams
from server.model.config import ModelConfig
from server.model.deltas import ResidentDelta
from server.registry import TaskVersion

UNIT = 1000  # floats per fake delta: 4000 bytes


class FakeSource:
    """Every task exists; a task's load can be held back until its gate is opened."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.reads: list[TaskVersion] = []

    def lookup(self, task: str) -> TaskVersion:
        return ref(task)

    def read(self, ref: TaskVersion) -> bytes:
        self.reads.append(ref)
        gate = self.gates.get(ref.task)
        if gate is not None:
            gate.wait(5)
        return ref.task.encode()

    def tasks(self) -> list[TaskVersion]:
        return []


def ref(task: str, content: str | None = None) -> TaskVersion:
    """A version of `task` whose artifact bytes are `content` (the task's name by default)."""
    data = (content or task).encode()
    return TaskVersion(task, 1, hashlib.sha256(data).hexdigest(), len(data))


def fake_unpack(ref: TaskVersion, data: bytes) -> ResidentDelta:
    return ResidentDelta(ref.task, ref.sha256, {}, {"w": torch.zeros(UNIT)})


def tiny_config() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": 32,
            "hidden_size": 8,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        }
    )


def make_scheduler(
    blocks: int = 64, deltas: int = 4, max_running: int = 8, budget: int = 64, source: FakeSource | None = None
) -> Scheduler:
    config = tiny_config()
    kv = KVCache(config, blocks * 2 * 4 * 4 * 4, 4, torch.device("cpu"), torch.float32)  # 4-token blocks
    cache = DeltaCache(source or FakeSource(), deltas * UNIT * 4, fake_unpack)
    return Scheduler(kv, cache, max_running, budget)


def seq(task: str | None, prompt: int = 6, max_tokens: int = 3, version: TaskVersion | None = None) -> Sequence:
    request = GenerationRequest(
        f"{task}-{time.perf_counter_ns()}",
        task,
        tuple(range(prompt)),
        SamplingParams(max_tokens=max_tokens),
        version or (ref(task) if task else None),
    )
    return Sequence(request, IncrementalDetokenizer(None, [], ()), lambda item: None, 10_000)


def step(s: Scheduler) -> StepPlan:
    """One simulated step: cache every scheduled token, sample token 0 where due, finish at max_tokens."""
    plan = s.schedule()
    for c in plan.chunks:
        c.seq.num_computed += c.num_tokens
    for c in plan.chunks:
        if c.samples:
            c.seq.output.append(0)
            if len(c.seq.output) >= c.seq.request.params.max_tokens:
                s.finish(c.seq)
    return plan


def wait_ready(s: Scheduler, task: str, version: TaskVersion | None = None) -> None:
    deadline = time.monotonic() + 5
    while s.deltas.state(version or ref(task)) is not DeltaState.READY and time.monotonic() < deadline:
        time.sleep(0.005)


def test_request_joins_the_running_batch_between_steps() -> None:
    s = make_scheduler()
    a = seq(None, max_tokens=10)
    s.add(a)
    step(s)
    b = seq(None, prompt=5)
    s.add(b)
    plan = step(s)
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(a, 1), (b, 5)]


def test_long_prompt_is_prefilled_in_chunks_while_decodes_continue() -> None:
    s = make_scheduler(budget=8)
    a = seq(None, max_tokens=10)
    s.add(a)
    step(s)
    b = seq(None, prompt=20)
    s.add(b)
    sizes = [[c.num_tokens for c in step(s).chunks] for _ in range(3)]
    assert sizes == [[1, 7], [1, 7], [1, 6]]
    assert len(b.output) == 1


def test_waiting_request_runs_only_once_its_delta_is_resident_without_stalling_others() -> None:
    source = FakeSource()
    source.gates["slow"] = threading.Event()
    s = make_scheduler(source=source)
    slow, base = seq("slow"), seq(None, max_tokens=50)
    s.add(slow)
    s.add(base)
    for _ in range(3):
        assert [c.seq for c in step(s).chunks if c.seq is slow] == []
    assert base.num_computed > 0
    source.gates["slow"].set()
    wait_ready(s, "slow")
    assert any(c.seq is slow for c in step(s).chunks)
    assert slow.delta_entry is not None and slow.delta_entry.pins == 1


def test_eviction_never_touches_a_pinned_delta() -> None:
    s = make_scheduler(deltas=2)
    cache = s.deltas
    for task in ("a", "b"):
        cache.load(ref(task))
        wait_ready(s, task)
    pinned = cache.acquire(ref("a"))  # "a" is now pinned; "b" is the most recently loaded but unpinned
    cache.load(ref("c"))
    wait_ready(s, "c")
    assert set(cache.resident_tasks) == {"a", "c"} and cache.counters.evictions == 1
    cache.acquire(ref("c"))
    assert cache.state(ref("d")) is DeltaState.NO_ROOM
    assert cache.load(ref("d")) is DeltaState.NO_ROOM
    assert set(cache.resident_tasks) == {"a", "c"}
    cache.release(pinned)
    assert cache.state(ref("d")) is DeltaState.ABSENT, "a query starts no load"
    assert cache.load(ref("d")) is DeltaState.LOADING
    wait_ready(s, "d")
    assert set(cache.resident_tasks) == {"c", "d"}


def test_invalidated_delta_stays_for_its_running_requests_then_goes() -> None:
    s = make_scheduler()
    s.deltas.load(ref("a"))
    wait_ready(s, "a")
    entry = s.deltas.acquire(ref("a"))
    s.deltas.invalidate("a")
    assert s.deltas.resident_tasks == [] and s.deltas.resident_bytes == UNIT * 4
    s.deltas.release(entry)
    assert s.deltas.resident_bytes == 0


def test_no_starvation_under_a_skewed_mix() -> None:
    """A hot task floods the queue; a cold task (slow to load, no room while hot is pinned) still finishes."""
    source = FakeSource()
    source.gates["cold"] = threading.Event()
    s = make_scheduler(deltas=1, max_running=3, source=source)
    cold = seq("cold", max_tokens=2)
    deadline = time.monotonic() + 20
    for i in range(100_000):
        if len(s.waiting) < 40:
            s.add(seq("hot", max_tokens=4))
        if i == 3:
            s.add(cold)
        if i == 10:
            source.gates["cold"].set()
        if not step(s).chunks:
            time.sleep(0.001)
        if len(cold.output) >= 2 or time.monotonic() > deadline:
            break
    assert len(cold.output) == 2, "the cold task starved behind the hot one"


def test_blocks_running_out_preempts_the_newest_sequence() -> None:
    s = make_scheduler(blocks=6)
    old, new = seq(None, prompt=8, max_tokens=12), seq(None, prompt=8, max_tokens=12)
    s.add(old)
    s.add(new)
    for _ in range(40):
        step(s)
        assert s.kv.used_blocks <= 6
    assert len(old.output) == 12 and len(new.output) == 12
    assert s.kv.used_blocks == 0


def test_a_resident_version_never_serves_a_request_that_resolved_another() -> None:
    """No notification at all: v1 is resident and running; a request resolved to v2 waits for v2's own
    load, runs on v2, and v1 goes once its last request ends (a rollback to v1 loads v1 again)."""
    source = FakeSource()
    s = make_scheduler(source=source)
    v1, v2 = ref("t", "t-v1"), ref("t", "t-v2")
    old = seq("t", max_tokens=20, version=v1)
    s.add(old)
    wait_ready(s, "t", v1)
    step(s)
    assert old.delta_entry.delta.sha256 == v1.sha256
    source.gates["t"] = threading.Event()
    new = seq("t", version=v2)
    s.add(new)
    for _ in range(3):
        assert new not in [c.seq for c in step(s).chunks], "v2's request ran before v2 was resident"
    source.gates["t"].set()
    wait_ready(s, "t", v2)
    step(s)
    assert new.delta_entry is not None and new.delta_entry.delta.sha256 == v2.sha256
    assert old.delta_entry.delta.sha256 == v1.sha256 and s.deltas.resident_version("t") == v2.sha256
    assert s.deltas.resident_bytes == 2 * UNIT * 4  # v1 retired but pinned by its running request
    s.finish(old)
    assert s.deltas.resident_bytes == UNIT * 4 and s.deltas.load(v1) is DeltaState.LOADING
    wait_ready(s, "t", v1)
    assert [r.sha256 for r in source.reads] == [v1.sha256, v2.sha256, v1.sha256]


def test_a_failed_load_fails_only_the_requests_of_that_version() -> None:
    class Broken(FakeSource):
        def read(self, version: TaskVersion) -> bytes:
            if version.sha256 == bad.sha256:
                raise OSError("blob gone")
            return super().read(version)

    bad, good = ref("t", "bad"), ref("t", "good")
    s = make_scheduler(source=Broken())
    doomed, fine = seq("t", version=bad), seq("t", version=good)
    s.add(doomed)
    s.add(fine)
    deadline, failed = time.monotonic() + 5, []
    while len(fine.output) < 3 and time.monotonic() < deadline:
        failed += [f for f, _ in step(s).failed]
    assert failed == [doomed] and len(fine.output) == 3


def test_resident_bytes_return_under_budget_once_pins_drain() -> None:
    """A load that completes while the others are pinned overshoots the budget; the releases bring
    the cache back under it (least recently used first), never touching a pinned delta."""
    source = FakeSource()
    s = make_scheduler(deltas=2, source=source)
    cache = s.deltas
    cache.load(ref("a"))
    wait_ready(s, "a")
    a = cache.acquire(ref("a"))
    cache.load(ref("b"))
    wait_ready(s, "b")
    source.gates["c"] = threading.Event()
    assert cache.load(ref("c")) is DeltaState.LOADING  # a alone is pinned: room for one more
    b = cache.acquire(ref("b"))
    source.gates["c"].set()
    wait_ready(s, "c")
    assert cache.resident_bytes == 3 * UNIT * 4 and cache.counters.evictions == 0
    cache.release(a)
    assert cache.resident_bytes <= cache.budget and set(cache.resident_tasks) == {"b", "c"}
    cache.release(b)
    assert cache.resident_bytes <= cache.budget and cache.counters.evictions == 1


def test_a_burst_of_many_tasks_ends_within_the_budget() -> None:
    s = make_scheduler(deltas=2, max_running=6, budget=64)
    burst = [seq(f"t{i % 7}", max_tokens=2 + i % 3) for i in range(28)]
    for item in burst:
        s.add(item)
    deadline = time.monotonic() + 20
    while s.has_work() and time.monotonic() < deadline:
        if not step(s).chunks:
            time.sleep(0.001)
    assert all(len(item.output) == item.request.params.max_tokens for item in burst)
    assert s.deltas.resident_bytes <= s.deltas.budget


class DigitTokenizer:
    """Token i decodes to the digit i % 10 (no special tokens)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(str(i % 10) for i in ids)


def text_seq(stop_ids: frozenset[int] = frozenset(), stop: tuple[str, ...] = (), max_tokens: int = 8) -> Sequence:
    request = GenerationRequest(f"q-{time.perf_counter_ns()}", None, (1, 2, 3), SamplingParams(max_tokens=max_tokens))
    detok = IncrementalDetokenizer(DigitTokenizer(), [1, 2, 3], stop)
    return Sequence(request, detok, lambda item: None, 10_000, stop_token_ids=stop_ids)


def run_step(s: Scheduler, tokens: dict[Sequence, int | None], fail: Sequence | None = None) -> StepOutput:
    """Schedule one step and hand postprocess the given sampled token of each chunk (or `fail`'s error)."""
    results = []
    for c in s.schedule().chunks:
        if c.seq is fail:
            results.append(ChunkResult(c, error=RequestFailedError("boom")))
        else:
            results.append(ChunkResult(c, tokens.get(c.seq) if c.samples else None))
    return s.postprocess(results)


def test_postprocess_advances_appends_and_finishes_in_the_scheduler() -> None:
    """A 4-token budget over three 3-token prompts: `length` at max_tokens, `stop` on a stop token id and
    on a stop string, each finished sequence's blocks freed by postprocess itself."""
    s = make_scheduler(budget=4)
    long, stopped, texted = text_seq(max_tokens=2), text_seq(stop_ids=frozenset({9})), text_seq(stop=("45",))
    for item in (long, stopped, texted):
        s.add(item)
    out = run_step(s, {long: 5})  # long's whole prompt, stopped's first token
    assert out.emitted == [(long, 5)] and out.sampled == 1 and (long.num_computed, stopped.num_computed) == (3, 1)
    out = run_step(s, {long: 6, stopped: 9})  # long's decode, stopped's last two, texted's first
    assert out.emitted == [(long, 6), (stopped, 9)] and texted.num_computed == 1
    assert (long.finish_reason, long.output) == ("length", [5, 6])
    assert (stopped.finish_reason, stopped.output) == ("stop", [9])
    assert s.running == [texted] and s.kv.used_blocks == 1
    out = run_step(s, {texted: 4})
    assert out.emitted == [(texted, 4)] and texted.finish_reason is None
    out = run_step(s, {texted: 5})
    assert out.emitted == [(texted, 5)] and texted.finish_reason == "stop" and texted.detok.stopped
    assert not s.has_work() and s.kv.used_blocks == 0


def test_postprocess_removes_a_failed_chunk_and_counts_it() -> None:
    s = make_scheduler()
    bad, good = text_seq(), text_seq()
    s.add(bad)
    s.add(good)
    out = run_step(s, {good: 1}, fail=bad)
    assert out.failed == [(bad, out.failed[0][1])] and str(out.failed[0][1]) == "boom"
    assert out.emitted == [(good, 1)] and out.sampled == 1
    assert bad not in s.running and bad.blocks == [] and good in s.running
