"""One request's life inside the engine: its tokens, KV blocks, task slot, sampler state and output sink."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from server.engine.delta_cache import Entry
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.types import FinishReason, GenerationChunk, GenerationRequest, TokenLogprob
from server.registry import TaskVersion

if TYPE_CHECKING:
    import xgrammar as xgr

Sink = Callable[[GenerationChunk | BaseException], None]
_arrival = itertools.count()


class Status(enum.Enum):
    """Where a sequence is: waiting for admission, running, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request inside the engine, from its arrival until its last chunk is sent."""

    request: GenerationRequest
    detok: IncrementalDetokenizer
    sink: Sink
    max_len: int
    """Prompt plus output may not exceed this many tokens (the context)."""
    generator: torch.Generator | None = None
    stop_token_ids: frozenset[int] = frozenset()
    """Sampling one of these ends the sequence with `stop`: the request's stop token ids, and the base's
    EOS ids unless the request ignores EOS."""
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose K/V is in the cache."""
    status: Status = Status.WAITING
    arrival: int = field(default_factory=lambda: next(_arrival))
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    delta_entry: Entry | None = None
    """The pinned delta-cache entry of `ref` while running with a task (None for the base)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of the sequence's leading full blocks, as far as they were needed."""
    num_cached_blocks: int = 0
    """Leading `blocks` that are published in the prefix cache (claimed at admission or published since)."""
    matcher: xgr.GrammarMatcher | None = None
    """The grammar's parse state of a constrained request; None for free text."""

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def task(self) -> str | None:
        """The request's task; None for the base alone."""
        return self.request.task

    @property
    def ref(self) -> TaskVersion | None:
        """The task version this request runs with (resolved before it reached the engine)."""
        return self.request.ref

    @property
    def prompt(self) -> tuple[int, ...]:
        """The prompt's token ids."""
        return self.request.prompt_token_ids

    @property
    def length(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt) + len(self.output)

    @property
    def uncomputed(self) -> int:
        """Tokens still to run through the model before the next one can be sampled."""
        return self.length - self.num_computed

    def token_at(self, index: int) -> int:
        """The token at `index` of prompt + output."""
        n = len(self.prompt)
        return self.prompt[index] if index < n else self.output[index - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """The tokens at [start, stop) of prompt + output."""
        return [self.token_at(i) for i in range(start, stop)]

    def chunk(self, token_ids: tuple[int, ...], final: bool) -> GenerationChunk:
        """The chunk that reports `token_ids` and the text they completed; clears pending logprobs."""
        logprobs = tuple(self.pending_logprobs) if self.request.params.logprobs is not None else None
        self.pending_logprobs = []
        return GenerationChunk(
            request_id=self.request_id,
            text=self.detok.flush(final),
            token_ids=token_ids,
            finish_reason=self.finish_reason if final else None,
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.output),
            logprobs=logprobs,
        )
