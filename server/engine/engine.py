"""The Engine (contract D): one resident base, many tasks' deltas, continuous batching in a step thread.

The step loop runs in its own thread: it takes new requests and aborts from an inbox, asks the
scheduler for a plan, runs the model once for every scheduled row, has the scheduler record the
step's results (`postprocess`), and hands each request's chunk back to its asyncio queue. `generate`
is the async generator the HTTP layer iterates; `generate_choices` runs n samples of one request
(OpenAI's `n`), the later ones sharing the first one's prefill through the prefix cache.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import xgrammar as xgr

from server.config import Settings
from server.engine.delta_cache import DeltaCache
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import Grammars
from server.engine.kv_cache import KVCache, bytes_per_block
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, StepOutput
from server.engine.sequence import Sequence, Sink, Status
from server.engine.types import (
    DeltaLoadError,
    DeltaSource,
    EngineError,
    EngineNotReadyError,
    EngineStats,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    TaskNotFoundError,
)
from server.engine.validation import validate_request
from server.model.config import ModelConfig
from server.model.deltas import ResidentDelta, unpack_artifact
from server.model.llama import LlamaModel
from server.model.provision import resolve_base_model
from server.registry import RegistryUnavailableError, TaskVersion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("deltaserve.engine")
IDLE_WAIT_S = 0.5
LOAD_WAIT_S = 0.01
SCHEDULING_FAILED = "The engine failed while scheduling this request."


@dataclass(frozen=True)
class EngineCore:
    """What exists once the base is loaded, built whole by `Engine.start`: the model on its device, the KV
    cache, the delta cache, the scheduler, the runner and the compiled-grammar cache."""

    model: LlamaModel
    kv: KVCache
    deltas: DeltaCache
    scheduler: Scheduler
    runner: ModelRunner
    grammars: Grammars

    def close(self) -> None:
        """Stop the delta loader and the grammar compilers."""
        self.deltas.close()
        self.grammars.close()


@dataclass
class StepCounters:
    """The step loop's counters in EngineStats."""

    steps: int = 0
    tokens: int = 0
    failed_requests: int = 0


class Engine:
    """One resident base, many tasks' deltas: the asyncio surface over the step thread (contract D).

    Constructed, it knows the base (its folder, config, tokenizer and context length) and accepts nothing;
    `start` loads the base and builds the `EngineCore` whole, then starts the step thread."""

    def __init__(self, settings: Settings, source: DeltaSource) -> None:
        from transformers import AutoTokenizer

        self.settings = settings
        self.source = source
        self.base_dir = resolve_base_model(settings.base_model, settings.resolved(settings.model_cache))
        self.base_name = Path(settings.base_model).name
        self.config = ModelConfig.from_dir(self.base_dir)
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(self.base_dir)
        self.device = torch.device(settings.device)
        self.dtype: torch.dtype = getattr(torch, settings.dtype)
        blocks = settings.kv_cache_bytes // bytes_per_block(self.config, settings.kv_block_size, self.dtype)
        self.max_model_len = min(self.config.max_position_embeddings, blocks * settings.kv_block_size)
        self.eos_ids = frozenset(self.config.eos_token_ids) | _tokenizer_eos(self.tokenizer)
        self._core: EngineCore | None = None
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._active: dict[str, Sequence] = {}
        self._accepting = False
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self._counts = StepCounters()

    @property
    def ready(self) -> bool:
        """Loaded, stepping and accepting requests."""
        return self._accepting and self._thread is not None and self._thread.is_alive()

    @property
    def core(self) -> EngineCore:
        """The loaded parts; EngineNotReadyError before `start` has loaded the base."""
        if self._core is None:
            raise EngineNotReadyError("the engine has not loaded its base yet")
        return self._core

    @property
    def model(self) -> LlamaModel:
        """The loaded base model (benchmarks read its weights)."""
        return self.core.model

    async def start(self) -> None:
        """Load the base onto the device, build the core, start the step thread."""
        self._core = await asyncio.to_thread(self._build_core)
        self._thread = threading.Thread(target=self._loop, args=(self._core,), name="engine-step", daemon=True)
        self._thread.start()
        self._accepting = True

    def _build_core(self) -> EngineCore:
        started = time.perf_counter()
        settings = self.settings
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model = LlamaModel.from_dir(self.base_dir, self.device, self.dtype)
        kv = KVCache(self.config, settings.kv_cache_bytes, settings.kv_block_size, self.device, self.dtype)
        deltas = DeltaCache(self.source, settings.delta_cache_bytes, self._unpack, self._wake)
        scheduler = Scheduler(kv, deltas, settings.max_running, settings.max_batch_tokens, settings.prefix_cache)
        grammars = Grammars(
            self.tokenizer,
            self.config.vocab_size,
            self.eos_ids,
            settings.grammar_cache_size,
            settings.grammar_compile_timeout_s,
        )
        core = EngineCore(model, kv, deltas, scheduler, ModelRunner(model, kv, self.tokenizer), grammars)
        log.info(
            "base %s loaded in %.1fs; KV cache %d blocks of %d tokens",
            self.base_name,
            time.perf_counter() - started,
            kv.num_blocks,
            kv.block_size,
        )
        return core

    def _unpack(self, ref: TaskVersion, data: bytes) -> ResidentDelta:
        return unpack_artifact(ref.task, data, self.base_dir, self.device, self.dtype, sha256=ref.sha256)

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop admitting; let in-flight requests finish within `timeout`, then abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._core is not None:
            self._core.close()

    def _has_work(self) -> bool:
        with self._cond:
            return bool(self._inbox or self._active)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream the request's chunks; closing the generator early aborts the request."""
        if not self.ready:
            raise EngineNotReadyError("the engine is starting or shutting down")
        validate_request(request, self.max_model_len, self.config.vocab_size)
        request = await self._resolved(request)
        grammar = request.params.grammar
        compiled = await self.core.grammars.compiled(grammar) if grammar is not None else None
        queue: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        self._submit(self._sequence(request, _thread_safe_sink(queue), compiled))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                await self.abort(request.request_id)

    async def _resolved(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the version of its task it runs: the one the caller resolved, or (for a
        caller that did not) the source's current version, looked up once here."""
        if request.ref is not None:
            if request.ref.task != request.task:
                raise InvalidRequestError(
                    f"the request names task {request.task!r} but carries a version of {request.ref.task!r}", "task"
                )
            return request
        if request.task is None:
            return request
        return replace(request, ref=await self._lookup(request.task))

    async def _lookup(self, task: str) -> TaskVersion:
        ref = await asyncio.to_thread(self.source.lookup, task)
        if ref is None:
            raise TaskNotFoundError(f"task {task!r} is not published")
        return ref

    async def generate_choices(
        self, request: GenerationRequest, n: int
    ) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
        """`n` samples of the request, as (choice index, chunk) in arrival order. Choice 0 runs first; the
        others start once its first chunk arrived (its prompt's full KV blocks are then published, so
        they prefill only the last partial block), as request ids `<id>-<i>` with seed `seed + i` when
        a seed is given. Closing the generator aborts every unfinished choice."""
        async with aclosing(self.generate(request)) as first_stream:
            yield 0, await anext(first_stream)
            if n == 1:
                async for chunk in first_stream:
                    yield 0, chunk
                return
            others = [self.generate(_choice(request, i)) for i in range(1, n)]
            async with aclosing(_merged([first_stream, *others])) as merged:
                async for item in merged:
                    yield item

    def _sequence(self, request: GenerationRequest, sink: Sink, grammar: xgr.CompiledGrammar | None) -> Sequence:
        params = request.params
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        detok = IncrementalDetokenizer(self.tokenizer, list(request.prompt_token_ids), params.stop)
        matcher = self.core.grammars.matcher(grammar) if grammar is not None else None
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        return Sequence(request, detok, sink, self.max_model_len, generator, stop_ids, matcher=matcher)

    def _submit(self, seq: Sequence) -> None:
        with self._cond:
            if self._queue_depth() >= self.settings.max_queue:
                raise QueueFullError(f"{self.settings.max_queue} requests are already waiting")
            if seq.request_id in self._active:
                raise InvalidRequestError(f"request id {seq.request_id!r} is already running", "request_id")
            self._active[seq.request_id] = seq
            self._inbox.append(seq)
            self._cond.notify_all()

    async def abort(self, request_id: str) -> None:
        """End the request with `abort` at the step thread's next turn (a no-op once it ended)."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    async def prefetch(self, task: str) -> None:
        """Make the task's delta resident (admin "warm"); raises TaskNotFoundError / DeltaLoadError, or
        EngineNotReadyError before the base is loaded."""
        deltas = self.core.deltas
        ref = await self._lookup(task)
        try:
            await asyncio.wrap_future(deltas.prefetch(ref))
        except (EngineError, RegistryUnavailableError):
            raise
        except Exception as exc:
            raise DeltaLoadError(f"delta of {task!r} failed to load: {exc}") from exc

    def invalidate(self, task: str, keep_sha: str | None = None) -> None:
        """The task changed: retire its resident versions other than `keep_sha` (frees them early;
        requests never use a version other than the one they resolved anyway)."""
        if self._core is not None:
            self._core.deltas.invalidate(task, keep_sha)

    def stats(self) -> EngineStats:
        """A snapshot for /metrics and the admin API (the core's fields zero before the base is loaded)."""
        core = self._core
        if core is None:
            return EngineStats(
                queue_depth=self._queue_depth(),
                running=0,
                kv_blocks_used=0,
                kv_blocks_total=0,
                delta_hits=0,
                delta_misses=0,
                resident_bytes=0,
                resident_tasks=(),
                load_seconds=0.0,
                delta_loads=0,
                evictions=0,
            )
        cache, prefix, counts = core.deltas.counters, core.scheduler.prefix, self._counts
        return EngineStats(
            queue_depth=self._queue_depth(),
            running=len(core.scheduler.running),
            kv_blocks_used=core.kv.used_blocks,
            kv_blocks_total=core.kv.num_blocks,
            delta_hits=cache.hits,
            delta_misses=cache.misses,
            resident_bytes=core.deltas.resident_bytes,
            resident_tasks=tuple(core.deltas.resident_tasks),
            load_seconds=cache.load_seconds,
            delta_loads=cache.loads,
            evictions=cache.evictions,
            steps=counts.steps,
            generated_tokens=counts.tokens,
            failed_requests=counts.failed_requests,
            prefix_cache_prompt_tokens=prefix.prompt_tokens,
            prefix_cache_hit_tokens=prefix.hit_tokens,
            prefix_cache_hit_rate=prefix.hit_tokens / prefix.prompt_tokens if prefix.prompt_tokens else 0.0,
            prefix_cache_blocks=core.kv.cached_blocks,
            prefix_cache_evictions=core.kv.evictions,
        )

    def _queue_depth(self) -> int:
        waiting = len(self._core.scheduler.waiting) if self._core is not None else 0
        return waiting + len(self._inbox)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self, core: EngineCore) -> None:
        while True:
            with self._cond:
                if self._shutdown:
                    break
                self._take_inbox(core.scheduler)
                if not core.scheduler.has_work():
                    self._cond.wait(IDLE_WAIT_S)
                    continue
            self._step_guarded(core)
        self._abort_all(core.scheduler)

    def _take_inbox(self, scheduler: Scheduler) -> None:
        """Under the lock: move new sequences to the scheduler and apply pending aborts."""
        for seq in self._inbox:
            scheduler.add(seq)
        self._inbox.clear()
        for request_id in self._aborts:
            aborted = self._active.get(request_id)
            if aborted is not None:
                self._end(scheduler, aborted, "abort")
        self._aborts.clear()

    def _step_guarded(self, core: EngineCore) -> None:
        try:
            self._step(core)
        except Exception:
            # the runner isolates model and sampling faults per request; this is the last resort for a
            # fault outside them (scheduling, bookkeeping), where no single request can be blamed: every
            # request past the waiting list ends (running, or finished in the step but not yet told)
            log.exception("engine step failed outside the model; ending the running requests")
            with self._cond:
                started = [seq for seq in self._active.values() if seq.status is not Status.WAITING]
            for seq in started:
                self._fail(core.scheduler, seq, RequestFailedError(SCHEDULING_FAILED))

    def _step(self, core: EngineCore) -> None:
        """One step: schedule, run the model, the scheduler's bookkeeping, then delivery to the streams."""
        plan = core.scheduler.schedule()
        for seq, error in plan.failed:
            self._fail(core.scheduler, seq, _load_error(error))
        if not plan.chunks:
            with self._cond:
                self._cond.wait(LOAD_WAIT_S)
            return
        self._emit(core.scheduler.postprocess(core.runner.step(plan.chunks)))
        self._counts.steps += 1

    def _emit(self, out: StepOutput) -> None:
        """Hand the step's tokens and failures to their requests' streams, and count them."""
        self._counts.tokens += out.sampled
        self._counts.failed_requests += len(out.failed)
        for seq, error in out.failed:
            self._deliver(seq, error)
        for seq, token in out.emitted:
            self._deliver(seq, seq.chunk((token,), seq.finish_reason is not None))

    def _end(self, scheduler: Scheduler, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        scheduler.finish(seq)
        self._deliver(seq, seq.chunk((), True))

    def _fail(self, scheduler: Scheduler, seq: Sequence, error: BaseException) -> None:
        scheduler.finish(seq, failed=True)
        self._deliver(seq, error)

    def _deliver(self, seq: Sequence, item: GenerationChunk | BaseException) -> None:
        """Send one item to the request's stream; its last one (an error, or a chunk with a finish reason)
        first takes the request out of the active ones."""
        if isinstance(item, BaseException) or item.finish_reason is not None:
            with self._cond:
                self._active.pop(seq.request_id, None)
        seq.sink(item)

    def _abort_all(self, scheduler: Scheduler) -> None:
        with self._cond:
            self._take_inbox(scheduler)
            pending = list(self._active.values())
        for seq in pending:
            self._end(scheduler, seq, "abort")


def _load_error(error: BaseException) -> BaseException:
    """What a request whose delta failed to load ends with: the engine's or the registry's own error, else
    DeltaLoadError."""
    return error if isinstance(error, (EngineError, RegistryUnavailableError)) else DeltaLoadError(str(error))


def _choice(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of an n > 1 request: its own request id and, for a seeded request, seed + index."""
    seed = request.params.seed
    params = replace(request.params, seed=None if seed is None else _wrap_int64(seed + index))
    return replace(request, request_id=f"{request.request_id}-{index}", params=params)


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


async def _merged(
    streams: list[AsyncGenerator[GenerationChunk, None]],
) -> AsyncGenerator[tuple[int, GenerationChunk], None]:
    """Every chunk of every stream as (stream index, chunk), as they arrive; the first error raises. On
    exit (done, error, or the consumer closing) every stream is closed, which aborts unfinished ones."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[GenerationChunk, None]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the merging consumer, which re-raises it
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    running = len(tasks)
    try:
        while running:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                running -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _thread_safe_sink(queue: asyncio.Queue[GenerationChunk | BaseException]) -> Sink:
    loop = asyncio.get_running_loop()

    def put(item: GenerationChunk | BaseException) -> None:
        with suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, item)

    return put


def _tokenizer_eos(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    eos = tokenizer.eos_token_id
    return frozenset({eos}) if isinstance(eos, int) else frozenset()
