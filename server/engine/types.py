"""The engine's typed surface: what the HTTP layer hands in and gets back, and what the registry provides.

These frozen dataclasses are the only channel between server/api (which knows HTTP and pydantic) and
server/engine (which knows neither). The registry implements DeltaSource; the engine reads artifacts
only through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from server.registry.records import TaskVersion

FinishReason = Literal["stop", "length", "abort"]
GrammarKind = Literal["json_object", "json_schema", "regex", "choice"]


@dataclass(frozen=True)
class GrammarSpec:
    """What a request's output must match; its rows are decoded under this grammar's token mask."""

    kind: GrammarKind
    source: str = ""
    """json_schema: the schema as canonical JSON; regex: the pattern; choice: a JSON list of the strings;
    json_object: empty (any JSON object)."""
    param: str = "response_format"
    """The request field it came from, named by errors (`response_format`, `guided_regex`, ...)."""


@dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are chosen and when its output stops."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    seed: int | None = None
    """Per-request seed: the same seed, prompt and task give the same tokens."""
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob and the top k alternatives."""
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) added to the row's logits before penalties and sampling (bounds: validation.py)."""
    grammar: GrammarSpec | None = None
    """The grammar the output must match (constrained decoding); None for free text."""


@dataclass(frozen=True)
class GenerationRequest:
    """One request as the engine receives it: prompt tokens, task and its version, sampling."""

    request_id: str
    task: str | None
    """The task whose delta applies; None for the base model alone."""
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    ref: TaskVersion | None = None
    """The task's version as the caller resolved it (once, for the whole request); the engine serves
    exactly this version's delta. None with a task: the engine resolves it through its DeltaSource."""


@dataclass(frozen=True)
class TokenLogprob:
    """The logprob of one sampled token, and of its top alternatives."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()
    """(token_id, token text, logprob) of the top alternatives, best first."""


@dataclass(frozen=True)
class GenerationChunk:
    """One step's output for one request; the last chunk carries finish_reason."""

    request_id: str
    text: str
    """New text since the previous chunk (complete UTF-8 characters only; stop strings withheld)."""
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] | None = None


class DeltaSource(Protocol):
    """Where the engine's delta cache reads artifacts from (the registry implements it)."""

    def lookup(self, task: str) -> TaskVersion | None:
        """The task's current version, or None when no such task is published; raises
        RegistryUnavailableError when the task is not known and the registry cannot be reached."""
        ...

    def read(self, ref: TaskVersion) -> bytes:
        """The artifact bytes of `ref`, sha256-checked; raises when they do not match."""
        ...

    def tasks(self) -> list[TaskVersion]:
        """Every published task's current version."""
        ...


class EngineError(Exception):
    """Base of the engine's errors that the HTTP layer maps to status codes."""


class TaskNotFoundError(EngineError):
    """The request names a task that is not published (HTTP 404 model_not_found)."""


class QueueFullError(EngineError):
    """The engine's waiting queue is at its limit (HTTP 429 with Retry-After)."""


class EngineNotReadyError(EngineError):
    """The engine is starting or shutting down (HTTP 503)."""


class InvalidRequestError(EngineError):
    """The request cannot run: prompt too long for the context, bad parameter (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class DeltaLoadError(EngineError):
    """The task is published but its delta could not be made resident (corrupt or wrong-base artifact,
    larger than the delta cache budget); HTTP 503 with code task_unavailable."""


class RequestFailedError(EngineError):
    """One request failed inside the engine (non-finite logits on its row, a sampling failure); only that
    request ends, every other row of the step goes on. The message is written for the caller and holds
    no internal detail (HTTP 500, code `request_failed`, sent as an error event when streaming)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine for /metrics and the admin API."""

    queue_depth: int
    """Requests waiting to be admitted (including those whose delta is loading)."""
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    delta_hits: int
    """Requests whose task's delta was resident when they arrived."""
    delta_misses: int
    resident_bytes: int
    resident_tasks: tuple[str, ...]
    load_seconds: float
    """Total seconds spent loading deltas (read, check, unpack)."""
    delta_loads: int
    evictions: int
    steps: int = 0
    generated_tokens: int = 0
    failed_requests: int = 0
    """Requests ended by a fault of their own inside a step (non-finite logits, a forward that failed only
    for them); every other request of those steps went on."""
    prefix_cache_prompt_tokens: int = 0
    """Tokens of admitted requests (prompt, plus output so far for a re-admitted preempted one)."""
    prefix_cache_hit_tokens: int = 0
    """Of them, tokens whose K/V the prefix cache supplied (not computed)."""
    prefix_cache_hit_rate: float = 0.0
    """prefix_cache_hit_tokens / prefix_cache_prompt_tokens (0 before any request)."""
    prefix_cache_blocks: int = 0
    """KV blocks published in the prefix cache, in use or idle."""
    prefix_cache_evictions: int = 0
    """Idle published blocks reused for new tokens (their cached prefix forgotten) when no free block was left."""
