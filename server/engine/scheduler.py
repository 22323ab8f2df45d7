"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Each step spends a token budget: running decodes first (oldest first), then prefill chunks of running
sequences, then new admissions in arrival order. A waiting request is admitted only once the delta of
the very version it resolved (its TaskVersion) is resident; one whose delta is loading is passed over
(others keep running), while one that finds no room for its delta, or no KV blocks, holds the queue
until pins and blocks drain, so nothing behind it can starve it. When blocks run out mid-flight the
newest sequence is preempted (its blocks freed, recomputed later).

With prefix caching on, an admitted sequence first claims the published blocks that match its leading
full blocks (the chain starts from its task version's key, so nothing crosses tasks, the base or
versions) and prefills only the rest; the last token is always computed, since its logits are needed.
A sequence publishes its full blocks once a sampled token has shown its K/V finite.

After the forward, `postprocess` does the step's bookkeeping: each chunk's progress, each sampled
token appended (through the request's grammar and stop rules), and the sequences that finished or
failed removed with their blocks and pins freed. What reaches the requests' streams is the engine's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from server.engine.delta_cache import DeltaCache, DeltaState, key_of
from server.engine.kv_cache import KVCache, block_hash, prefix_root
from server.engine.sequence import Sequence, Status
from server.engine.types import RequestFailedError, TokenLogprob
from server.registry import TaskVersion

log = logging.getLogger("deltaserve.engine")
GRAMMAR_REJECTED = "The grammar of this request's response format rejected a token; the request ended."


@dataclass(frozen=True)
class ScheduledChunk:
    """A run of `num_tokens` of one sequence's tokens, from `start`, in the next step."""

    seq: Sequence
    start: int
    """Index of the chunk's first token in the sequence (tokens before it are cached)."""
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the sequence, so its last row yields the next token."""
        return self.start + self.num_tokens == self.seq.length


@dataclass(frozen=True)
class ChunkResult:
    """What one scheduled chunk produced: computed (and a sampled token when it reached the end), or failed."""

    chunk: ScheduledChunk
    token: int | None = None
    logprob: TokenLogprob | None = None
    error: RequestFailedError | None = None


@dataclass
class StepOutput:
    """What `postprocess` leaves for the engine to deliver."""

    emitted: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, its token) for each sequence that took a token; a finished one carries finish_reason."""
    failed: list[tuple[Sequence, RequestFailedError]] = field(default_factory=list)
    """Sequences ended by a fault of their own (forward, sampling, grammar), already removed."""
    sampled: int = 0
    """Tokens sampled in the step (a token its grammar rejected too)."""


@dataclass(frozen=True)
class StepPlan:
    """The next step: the chunks to run, and the waiting sequences to end."""

    chunks: tuple[ScheduledChunk, ...]
    failed: tuple[tuple[Sequence, BaseException], ...]
    """Waiting sequences whose delta failed to load: the engine ends them with the error."""


@dataclass
class PrefixCounters:
    """How much of the admitted tokens' K/V the prefix cache supplied."""

    prompt_tokens: int = 0
    """Tokens of admitted sequences (a preempted sequence counts again when it is re-admitted)."""
    hit_tokens: int = 0
    """Of them, tokens whose K/V came from published blocks instead of being computed."""


class Scheduler:
    """The waiting and running sequences, and the step plans and bookkeeping over them."""

    def __init__(
        self, kv: KVCache, deltas: DeltaCache, max_running: int, max_batch_tokens: int, prefix_cache: bool = True
    ) -> None:
        self.kv = kv
        self.deltas = deltas
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.prefix_cache = prefix_cache
        self.prefix = PrefixCounters()
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (its delta counted as a hit or miss and loaded if absent)."""
        if seq.ref is not None:
            self.deltas.request(seq.ref)
        self.waiting.append(seq)

    def has_work(self) -> bool:
        """Some sequence waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan:
        """The next step's chunks under the token budget (see the module docstring)."""
        chunks: list[ScheduledChunk] = []
        budget = self.max_batch_tokens
        for seq in sorted(self.running, key=lambda s: (s.uncomputed > 1, s.arrival)):
            if budget == 0:
                break
            if seq.status is Status.RUNNING and self._reserve(seq, min(seq.uncomputed, budget), chunks):
                chunks.append(ScheduledChunk(seq, seq.num_computed, min(seq.uncomputed, budget)))
                budget -= chunks[-1].num_tokens
        failed = self._admit(chunks, budget)
        return StepPlan(tuple(chunks), tuple(failed))

    def _admit(self, chunks: list[ScheduledChunk], budget: int) -> list[tuple[Sequence, BaseException]]:
        failed: list[tuple[Sequence, BaseException]] = []
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_running:
                break
            state = self.deltas.load(seq.ref) if seq.ref is not None else DeltaState.READY
            if state is DeltaState.FAILED and seq.ref is not None:
                failed.extend(self._fail_version(seq.ref))
                continue
            if state is DeltaState.LOADING:
                continue
            hits = self._cached_prefix(seq)
            cached = len(hits) * self.kv.block_size
            n = min(seq.length - cached, budget)
            need = self.kv.blocks_needed(len(hits), cached + n)
            if state is DeltaState.NO_ROOM or not self.kv.can_allocate(need, hits):
                break
            if not self._start(seq, hits, need):
                continue
            chunks.append(ScheduledChunk(seq, cached, n))
            budget -= n
        return failed

    def _start(self, seq: Sequence, hits: list[int], need: int) -> bool:
        """Pin the sequence's delta, claim its cached prefix `hits` and give it `need` more blocks; False
        when its delta went meanwhile (the loader made room for another), so it waits for a reload."""
        seq.delta_entry = self.deltas.acquire(seq.ref) if seq.ref is not None else None
        if seq.ref is not None and seq.delta_entry is None:
            return False
        self.kv.claim(hits)
        seq.blocks = hits + self.kv.allocate(need)
        seq.num_cached_blocks = len(hits)
        seq.num_computed = len(hits) * self.kv.block_size
        self.prefix.prompt_tokens += seq.length
        self.prefix.hit_tokens += seq.num_computed
        seq.status = Status.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """The published blocks that hold the sequence's leading full blocks, within all but its last
        token (that one is always computed: its logits are needed)."""
        if not self.prefix_cache:
            return []
        return self.kv.match(self._hashes(seq, (seq.length - 1) // self.kv.block_size))

    def postprocess(self, results: Iterable[ChunkResult]) -> StepOutput:
        """The step's bookkeeping, in result order: a failed chunk's sequence is removed (its blocks leave
        the prefix cache); a computed chunk advances `num_computed`, and its sampled token, if any,
        publishes the sequence's full blocks and is appended."""
        out = StepOutput()
        for result in results:
            seq = result.chunk.seq
            if result.error is not None:
                self.finish(seq, failed=True)
                out.failed.append((seq, result.error))
                continue
            seq.num_computed += result.chunk.num_tokens
            if result.token is None:
                continue
            out.sampled += 1
            self.publish(seq)
            if self._append(seq, result.token, result.logprob):
                out.emitted.append((seq, result.token))
            else:
                self.finish(seq, failed=True)
                out.failed.append((seq, RequestFailedError(GRAMMAR_REJECTED)))
        return out

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> bool:
        """Record one sampled token and decide whether the sequence is done (then it is finished); False,
        with nothing recorded, when the sequence's grammar rejects the token."""
        grammar_done = _advance_grammar(seq, token)
        if grammar_done is None:
            return False
        seq.output.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        stop_token = token in seq.stop_token_ids
        if not stop_token and not grammar_done:
            seq.detok.add(token)
        if stop_token or grammar_done or seq.detok.stopped:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.request.params.max_tokens or seq.length >= seq.max_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.finish(seq)
        return True

    def publish(self, seq: Sequence) -> None:
        """Publish the sequence's fully computed blocks; called once a sampled token of the sequence came
        from finite logits, which every K/V of its context entered."""
        full = seq.num_computed // self.kv.block_size
        if not self.prefix_cache or full <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_cached_blocks, len(hashes)):
            self.kv.publish(seq.blocks[i], hashes[i])
        seq.num_cached_blocks = len(hashes)

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The chain hashes of the sequence's first `count` full blocks (none for a task without a
        resolved version: it cannot be told apart from another version)."""
        if seq.task is not None and seq.ref is None:
            return []
        size = self.kv.block_size
        while len(seq.block_hashes) < count:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if i else prefix_root(seq.task, seq.ref.sha256 if seq.ref else None)
            seq.block_hashes.append(block_hash(parent, seq.tokens(i * size, (i + 1) * size)))
        return seq.block_hashes[:count]

    def _fail_version(self, ref: TaskVersion) -> list[tuple[Sequence, BaseException]]:
        """End every waiting request for the version whose load failed (other versions are not touched)."""
        error = self.deltas.take_failure(ref)
        doomed = [s for s in self.waiting if s.ref is not None and key_of(s.ref) == key_of(ref)]
        for seq in doomed:
            self.waiting.remove(seq)
            self.deltas.withdraw(ref)
            seq.status = Status.FINISHED
        return [(seq, error or RuntimeError(f"delta of {ref.task!r} failed to load")) for seq in doomed]

    def _reserve(self, seq: Sequence, num_tokens: int, chunks: list[ScheduledChunk]) -> bool:
        """Give `seq` the blocks for `num_tokens` more tokens, preempting the newest unscheduled sequences."""
        need = self.kv.blocks_needed(len(seq.blocks), seq.num_computed + num_tokens)
        scheduled = {id(c.seq) for c in chunks}
        while not self.kv.can_allocate(need):
            victims = [s for s in self.running if id(s) not in scheduled]
            if not victims:
                return False
            victim = max(victims, key=lambda s: s.arrival)
            self.preempt(victim)
            if victim is seq:
                return False
        seq.blocks.extend(self.kv.allocate(need))
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and pin; it waits again in arrival order and is recomputed."""
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        if seq.ref is not None:
            self.deltas.want(seq.ref)
        self.waiting.append(seq)
        self.waiting.sort(key=lambda s: s.arrival)

    def finish(self, seq: Sequence, failed: bool = False) -> None:
        """Remove a finished, aborted or `failed` sequence, wherever it is, freeing its blocks and pin; a
        failed one's blocks that nobody else holds leave the prefix cache (their K/V may be bad)."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            if seq.ref is not None:
                self.deltas.withdraw(seq.ref)
        self._release(seq, drop=failed)
        seq.status = Status.FINISHED

    def _release(self, seq: Sequence, drop: bool = False) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.kv.free(seq.blocks, drop)
        seq.blocks = []
        seq.num_cached_blocks = 0
        if seq.delta_entry is not None:
            self.deltas.release(seq.delta_entry)
            seq.delta_entry = None


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
