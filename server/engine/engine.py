"""The Engine (contract D): one resident base, many tasks' deltas, continuous batching in a step thread.

The step loop runs in its own thread: it takes new requests and aborts from an inbox, asks the
scheduler for a plan, runs the model once for every scheduled row, and hands each request's chunk
back to its asyncio queue. `generate` is the async generator the HTTP layer iterates; `generate_choices`
runs n samples of one request (OpenAI's `n`), the later ones sharing the first one's prefill through
the prefix cache.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from server.config import Settings
from server.engine.delta_cache import DeltaCache
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.grammar import Grammars
from server.engine.kv_cache import KVCache, bytes_per_block
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, Sink
from server.engine.types import (
    DeltaLoadError,
    DeltaSource,
    EngineError,
    EngineNotReadyError,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestFailedError,
    TaskNotFoundError,
    TokenLogprob,
)
from server.engine.validation import validate_request
from server.model.config import ModelConfig
from server.model.deltas import ResidentDelta, unpack_artifact
from server.model.llama import LlamaModel
from server.model.provision import resolve_base_model
from server.registry import RegistryUnavailableError, TaskVersion

log = logging.getLogger("deltaserve.engine")
GRAMMAR_REJECTED = "The grammar of this request's response format rejected a token; the request ended."
IDLE_WAIT_S = 0.5
LOAD_WAIT_S = 0.01


class Engine:
    def __init__(self, settings: Settings, source: DeltaSource) -> None:
        from transformers import AutoTokenizer

        self.settings = settings
        self.source = source
        self.base_dir = resolve_base_model(settings.base_model, settings.resolved(settings.model_cache))
        self.base_name = Path(settings.base_model).name
        self.config = ModelConfig.from_dir(self.base_dir)
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.base_dir)
        self.device = torch.device(settings.device)
        self.dtype: torch.dtype = getattr(torch, settings.dtype)
        blocks = settings.kv_cache_bytes // bytes_per_block(self.config, settings.kv_block_size, self.dtype)
        self.max_model_len = min(self.config.max_position_embeddings, blocks * settings.kv_block_size)
        self.eos_ids = frozenset(self.config.eos_token_ids) | _tokenizer_eos(self.tokenizer)
        self._cond = threading.Condition()
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._active: dict[str, Sequence] = {}
        self._accepting = False
        self._shutdown = False
        self._thread: threading.Thread | None = None
        self._counts = {"steps": 0, "tokens": 0, "failed_requests": 0}

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread is not None and self._thread.is_alive()

    async def start(self) -> None:
        """Load the base onto the device, size the KV cache, start the step thread."""
        await asyncio.to_thread(self._build)
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()
        self._accepting = True

    def _build(self) -> None:
        started = time.perf_counter()
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        self.model = LlamaModel.from_dir(self.base_dir, self.device, self.dtype)
        self.kv = KVCache(
            self.config, self.settings.kv_cache_bytes, self.settings.kv_block_size, self.device, self.dtype
        )
        self.deltas = DeltaCache(self.source, self.settings.delta_cache_bytes, self._unpack, self._wake)
        self.scheduler = Scheduler(
            self.kv, self.deltas, self.settings.max_running, self.settings.max_batch_tokens, self.settings.prefix_cache
        )
        self.runner = ModelRunner(self.model, self.kv, self.tokenizer)
        self.grammars = Grammars(
            self.tokenizer,
            self.config.vocab_size,
            self.eos_ids,
            self.settings.grammar_cache_size,
            self.settings.grammar_compile_timeout_s,
        )
        log.info(
            "base %s loaded in %.1fs; KV cache %d blocks of %d tokens",
            self.base_name,
            time.perf_counter() - started,
            self.kv.num_blocks,
            self.kv.block_size,
        )

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
        if hasattr(self, "deltas"):
            self.deltas.close()
        if hasattr(self, "grammars"):
            self.grammars.close()

    def _has_work(self) -> bool:
        with self._cond:
            return bool(self._inbox or self._active)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the request's chunks; closing the generator early aborts the request."""
        if not self.ready:
            raise EngineNotReadyError("the engine is starting or shutting down")
        validate_request(request, self.max_model_len, self.config.vocab_size)
        request = await self._resolved(request)
        grammar = request.params.grammar
        compiled = await self.grammars.compiled(grammar) if grammar is not None else None
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

    async def generate_choices(self, request: GenerationRequest, n: int) -> AsyncIterator[tuple[int, GenerationChunk]]:
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

    def _sequence(self, request: GenerationRequest, sink: Sink, grammar: Any = None) -> Sequence:
        seed = request.params.seed
        generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        detok = IncrementalDetokenizer(self.tokenizer, list(request.prompt_token_ids), request.params.stop)
        matcher = self.grammars.matcher(grammar) if grammar is not None else None
        return Sequence(request, detok, sink, self.max_model_len, generator, matcher=matcher)

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
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify_all()

    async def prefetch(self, task: str) -> None:
        """Make the task's delta resident (admin "warm"); raises TaskNotFoundError / DeltaLoadError."""
        if not hasattr(self, "deltas"):
            raise EngineNotReadyError("the engine has not loaded its base yet")
        ref = await self._lookup(task)
        try:
            await asyncio.wrap_future(self.deltas.prefetch(ref))
        except (EngineError, RegistryUnavailableError):
            raise
        except Exception as exc:
            raise DeltaLoadError(f"delta of {task!r} failed to load: {exc}") from exc

    def invalidate(self, task: str, keep_sha: str | None = None) -> None:
        """The task changed: retire its resident versions other than `keep_sha` (frees them early;
        requests never use a version other than the one they resolved anyway)."""
        if hasattr(self, "deltas"):
            self.deltas.invalidate(task, keep_sha)

    def stats(self) -> EngineStats:
        counters = self.deltas.counters if hasattr(self, "deltas") else None
        kv = getattr(self, "kv", None)
        return EngineStats(
            queue_depth=self._queue_depth(),
            running=len(self.scheduler.running) if hasattr(self, "scheduler") else 0,
            kv_blocks_used=kv.used_blocks if kv else 0,
            kv_blocks_total=kv.num_blocks if kv else 0,
            delta_hits=counters.hits if counters else 0,
            delta_misses=counters.misses if counters else 0,
            resident_bytes=self.deltas.resident_bytes if counters else 0,
            resident_tasks=tuple(self.deltas.resident_tasks) if counters else (),
            load_seconds=counters.load_seconds if counters else 0.0,
            delta_loads=counters.loads if counters else 0,
            evictions=counters.evictions if counters else 0,
            steps=self._counts["steps"],
            generated_tokens=self._counts["tokens"],
            failed_requests=self._counts["failed_requests"],
            **self._prefix_stats(),
        )

    def _prefix_stats(self) -> dict[str, int | float]:
        """The prefix cache's fields of EngineStats (zeros before the base is loaded)."""
        if not hasattr(self, "scheduler"):
            return {}
        counts = self.scheduler.prefix
        return {
            "prefix_cache_prompt_tokens": counts.prompt_tokens,
            "prefix_cache_hit_tokens": counts.hit_tokens,
            "prefix_cache_hit_rate": counts.hit_tokens / counts.prompt_tokens if counts.prompt_tokens else 0.0,
            "prefix_cache_blocks": self.kv.cached_blocks,
            "prefix_cache_evictions": self.kv.evictions,
        }

    def _queue_depth(self) -> int:
        waiting = len(self.scheduler.waiting) if hasattr(self, "scheduler") else 0
        return waiting + len(self._inbox)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._shutdown:
                    break
                self._take_inbox()
                if not self.scheduler.has_work():
                    self._cond.wait(IDLE_WAIT_S)
                    continue
            self._step_guarded()
        self._abort_all()

    def _take_inbox(self) -> None:
        """Under the lock: move new sequences to the scheduler and apply pending aborts."""
        for seq in self._inbox:
            self.scheduler.add(seq)
        self._inbox.clear()
        for request_id in self._aborts:
            seq = self._active.get(request_id)
            if seq is not None:
                self._end(seq, "abort")
        self._aborts.clear()

    def _step_guarded(self) -> None:
        try:
            self._step()
        except Exception:
            # the runner isolates model and sampling faults per request; this is the last resort for a
            # fault outside them (scheduling, bookkeeping), where no single request can be blamed
            log.exception("engine step failed outside the model; ending the running requests")
            for seq in list(self.scheduler.running):
                self._fail(seq, RequestFailedError("The engine failed while scheduling this request."))

    def _step(self) -> None:
        plan = self.scheduler.schedule()
        for seq, error in plan.failed:
            self._fail(
                seq, error if isinstance(error, (EngineError, RegistryUnavailableError)) else DeltaLoadError(str(error))
            )
        if not plan.chunks:
            with self._cond:
                self._cond.wait(LOAD_WAIT_S)
            return
        for result in self.runner.step(plan.chunks):
            seq = result.chunk.seq
            if result.error is not None:
                self._counts["failed_requests"] += 1
                self._fail(seq, result.error)
                continue
            seq.num_computed += result.chunk.num_tokens
            if result.token is not None:
                self.scheduler.publish(seq)
                self._append(seq, result.token, result.logprob)
                self._counts["tokens"] += 1
        self._counts["steps"] += 1

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """Record one sampled token, decide whether the sequence is done, and send its chunk."""
        grammar_done = _advance_grammar(seq, token)
        if grammar_done is None:
            self._counts["failed_requests"] += 1
            self._fail(seq, RequestFailedError(GRAMMAR_REJECTED))
            return
        seq.output.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        params = seq.request.params
        stop_token = token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids)
        if not stop_token and not grammar_done:
            seq.detok.add(token)
        if stop_token or grammar_done or seq.detok.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output) >= params.max_tokens or seq.length >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._release(seq)
        seq.sink(seq.chunk((token,), seq.finish_reason is not None))

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason  # type: ignore[assignment]
        self._release(seq)
        seq.sink(seq.chunk((), True))

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self._release(seq, failed=True)
        seq.sink(error)

    def _release(self, seq: Sequence, failed: bool = False) -> None:
        self.scheduler.finish(seq, failed)
        with self._cond:
            self._active.pop(seq.request_id, None)

    def _abort_all(self) -> None:
        with self._cond:
            self._take_inbox()
            pending = list(self._active.values())
        for seq in pending:
            self._end(seq, "abort")


def _advance_grammar(seq: Sequence, token: int) -> bool | None:
    """Feed the token to the sequence's grammar: True when the grammar is now complete (the token was a
    stop token it allowed), False when it goes on or the sequence is unconstrained, None when the grammar
    rejects the token or fails."""
    if seq.matcher is None:
        return False
    try:
        if not seq.matcher.accept_token(token):
            return None
        return bool(seq.matcher.is_terminated())
    except Exception:
        log.exception("the grammar of request %s failed; only it ends", seq.request_id)
        return None


def _choice(request: GenerationRequest, index: int) -> GenerationRequest:
    """Choice `index` of an n > 1 request: its own request id and, for a seeded request, seed + index."""
    seed = request.params.seed
    params = replace(request.params, seed=None if seed is None else _wrap_int64(seed + index))
    return replace(request, request_id=f"{request.request_id}-{index}", params=params)


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


async def _merged(streams: list[AsyncIterator[GenerationChunk]]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Every chunk of every stream as (stream index, chunk), as they arrive; the first error raises. On
    exit (done, error, or the consumer closing) every stream is closed, which aborts unfinished ones."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[GenerationChunk]) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
            queue.put_nowait((index, None))
        except Exception as exc:  # noqa: BLE001 - handed to the merging consumer, which re-raises it
            queue.put_nowait((index, exc))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

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


def _tokenizer_eos(tokenizer: Any) -> frozenset[int]:
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset({eos}) if isinstance(eos, int) else frozenset()
