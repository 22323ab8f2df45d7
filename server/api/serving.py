"""Serving logic shared by the OpenAI endpoints; knows the engine and the protocol, not FastAPI.

A request's life: resolve the task (X-Task, else `model`), check the key's scope and that the task
exists, build SamplingParams (with its logit bias and grammar), start the engine's generator of the
request's `n` choices and pull its first chunk (so every engine error becomes an HTTP status before
any byte is sent), then collect or stream the chunks, each tagged with its choice index.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from server.api.errors import (
    MAPPED_ERRORS,
    APIError,
    bad_request,
    forbidden,
    from_engine,
    model_not_found,
)
from server.api.protocol import ChatCompletionRequest, ContentPart, SamplingFields, Usage
from server.auth import Principal
from server.config import Settings
from server.engine.types import (
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    GrammarSpec,
    SamplingParams,
    TokenLogprob,
)
from server.engine.validation import MAX_TOKENS_MIN, context_room
from server.observability.metrics import Metrics
from server.registry import TaskVersion, is_task_name

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class EngineClient(Protocol):
    """The part of contract D's Engine that the HTTP layer uses: serving, the routers and the app's
    lifespan (`server.api.context.ServerContext.engine`)."""

    base_name: str
    base_dir: Path
    max_model_len: int

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base's tokenizer: its chat template and encoder build the prompt's token ids."""
        ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self, timeout: float = ...) -> None: ...

    def generate_choices(
        self, request: GenerationRequest, n: int
    ) -> AsyncGenerator[tuple[int, GenerationChunk], None]: ...

    async def prefetch(self, task: str) -> None: ...

    def invalidate(self, task: str, keep_sha: str | None = ...) -> None: ...

    def stats(self) -> EngineStats: ...


class TaskLookup(Protocol):
    """Where a request's task is resolved: the registry's view of its index."""

    def lookup(self, task: str) -> TaskVersion | None: ...


@dataclass(frozen=True)
class Target:
    """What a request runs against: a task's delta, or the base alone (task None)."""

    task: str | None
    model: str
    """The model name the response reports."""
    ref: TaskVersion | None = None
    """The task's version, resolved once here; the engine serves exactly this version."""


def resolve_target(
    header_task: str | None, model: str, base_name: str, principal: Principal, tasks: TaskLookup
) -> Target:
    """X-Task wins; else `model` as `task`, `base:task` or the base itself; scope, then existence and the
    current version, looked up once for the whole request (a name that is no task name names no task;
    the registry's RegistryUnavailableError, when the task is not in the last known index and the
    registry cannot be reached, goes to the app's registry error handler)."""
    task = header_task.strip() if header_task and header_task.strip() else _task_of_model(model, base_name)
    if task is None:
        return Target(None, base_name)
    if not principal.may_use(task):
        raise forbidden(f"This API key may not use the task `{task}`.")
    found = tasks.lookup(task) if is_task_name(task) else None
    if found is None:
        raise model_not_found(task)
    return Target(task, task, found)


def _task_of_model(model: str, base_name: str) -> str | None:
    if model in ("", base_name):
        return None
    if model.startswith(base_name + ":"):
        return model[len(base_name) + 1 :] or None
    return model


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on request fields whose cost the caller controls: each is the setting of the same name
    (server.config.Settings holds their defaults)."""

    max_stop_strings: int
    max_stop_chars: int
    max_stop_token_ids: int
    max_prompt_chars: int
    max_messages: int
    max_n: int
    max_logit_bias: int
    max_grammar_chars: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        """The limits the settings give."""
        return cls(
            max_stop_strings=settings.max_stop_strings,
            max_stop_chars=settings.max_stop_chars,
            max_stop_token_ids=settings.max_stop_token_ids,
            max_prompt_chars=settings.max_prompt_chars,
            max_messages=settings.max_messages,
            max_n=settings.max_n,
            max_logit_bias=settings.max_logit_bias,
            max_grammar_chars=settings.max_grammar_chars,
        )


def check_chat_size(req: ChatCompletionRequest, limits: RequestLimits) -> None:
    """400 before the chat template runs when the messages are too many or their text too long."""
    if len(req.messages) > limits.max_messages:
        raise bad_request(f"At most {limits.max_messages} messages are allowed; got {len(req.messages)}.", "messages")
    chars = sum(_chars(m.content) for m in req.messages)
    if chars > limits.max_prompt_chars:
        raise bad_request(
            f"The messages hold {chars} characters; at most {limits.max_prompt_chars} are allowed.", "messages"
        )


def _chars(content: str | list[ContentPart] | None) -> int:
    if isinstance(content, list):
        return sum(len(part.text) for part in content)
    return len(content or "")


def check_prompt_size(
    prompt: str | list[str] | list[int] | list[list[int]], max_model_len: int, limits: RequestLimits
) -> None:
    """400 before tokenizing when a text prompt is too long, or a token prompt does not fit the context."""
    items = _prompt_items(prompt)
    if sum(len(item) for item in items if isinstance(item, str)) > limits.max_prompt_chars:
        raise bad_request(f"The prompt has more than {limits.max_prompt_chars} characters.", "prompt")
    for item in items:
        if isinstance(item, list):
            check_fits_context(len(item), max_model_len, "prompt")


def _prompt_items(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts `prompt` holds: one text, one token list, or a list of either (never mixed)."""
    if isinstance(prompt, str):
        return [prompt]
    ids = [item for item in prompt if isinstance(item, int)]
    return [ids] if ids else [item for item in prompt if not isinstance(item, int)]


def check_fits_context(prompt_len: int, max_model_len: int, param: str) -> int:
    """The room the context leaves after the prompt; 400 naming `param` (the OpenAI field that holds the
    prompt) when it leaves less than the engine's MAX_TOKENS_MIN."""
    room = context_room(prompt_len, max_model_len)
    if room < MAX_TOKENS_MIN:
        raise bad_request(f"The prompt has {prompt_len} tokens; the context holds {max_model_len}.", param)
    return room


def sampling_params(
    req: SamplingFields,
    prompt_len: int,
    max_model_len: int,
    max_tokens: int | None,
    logprobs: int | None,
    limits: RequestLimits,
    prompt_field: str,
) -> SamplingParams:
    """The engine's SamplingParams for an OpenAI request; 400 naming the parameter when unusable
    (`prompt_field`: the request's field that holds the prompt, `messages` or `prompt`)."""
    check_limits(req, limits)
    room = check_fits_context(prompt_len, max_model_len, prompt_field)
    if max_tokens is not None and max_tokens > room:
        raise bad_request(
            f"max_tokens={max_tokens} exceeds the {room} tokens left in the context "
            f"({max_model_len}) after the prompt ({prompt_len}).",
            "max_tokens",
        )
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        seed=req.seed,
        max_tokens=max_tokens or room,
        stop=req.stop_strings(),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logprobs=logprobs,
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias(req, limits),
        grammar=grammar_spec(req, limits),
    )


def check_limits(req: SamplingFields, limits: RequestLimits) -> None:
    """400 when the stop strings or stop token ids exceed their settings."""
    stops = req.stop_strings()
    if len(stops) > limits.max_stop_strings:
        raise bad_request(f"At most {limits.max_stop_strings} stop strings are allowed; got {len(stops)}.", "stop")
    if any(len(stop) > limits.max_stop_chars for stop in stops):
        raise bad_request(f"A stop string may have at most {limits.max_stop_chars} characters.", "stop")
    if len(req.stop_token_ids or ()) > limits.max_stop_token_ids:
        raise bad_request(f"At most {limits.max_stop_token_ids} stop token ids are allowed.", "stop_token_ids")
    if req.n > limits.max_n:
        raise bad_request(f"At most {limits.max_n} choices (n) are allowed; got {req.n}.", "n")


def logit_bias(req: SamplingFields, limits: RequestLimits) -> tuple[tuple[int, float], ...]:
    """`logit_bias` as (token id, bias) pairs; 400 naming it when too long or a key is not an integer
    (the engine's validation refuses ids beyond the vocabulary and biases outside its bounds)."""
    items = (req.logit_bias or {}).items()
    if len(items) > limits.max_logit_bias:
        raise bad_request(f"logit_bias may hold at most {limits.max_logit_bias} entries.", "logit_bias")
    pairs = []
    for key, bias in items:
        token = _int_or_none(key)
        if token is None:
            raise bad_request(f"logit_bias maps token ids (integers, as strings) to biases; got {key!r}.", "logit_bias")
        pairs.append((token, bias))
    return tuple(pairs)


def _int_or_none(text: str) -> int | None:
    try:
        return int(text) if len(text) <= 20 else None
    except ValueError:
        return None


def grammar_spec(req: SamplingFields, limits: RequestLimits) -> GrammarSpec | None:
    """The grammar of `response_format`, `guided_regex` or `guided_choice` (at most one of them); 400
    naming the field when its text exceeds `max_grammar_chars`."""
    fmt = req.response_format
    specs = [
        spec
        for spec in (
            _format_spec(fmt.type, fmt.json_schema.schema_ if fmt.json_schema else None) if fmt else None,
            GrammarSpec("regex", req.guided_regex, "guided_regex") if req.guided_regex is not None else None,
            GrammarSpec("choice", json.dumps(req.guided_choice), "guided_choice") if req.guided_choice else None,
        )
        if spec is not None
    ]
    if len(specs) > 1:
        raise bad_request("Give at most one of response_format (json), guided_regex and guided_choice.", specs[1].param)
    if specs and len(specs[0].source) > limits.max_grammar_chars:
        raise bad_request(
            f"The grammar of {specs[0].param} has more than {limits.max_grammar_chars} characters.", specs[0].param
        )
    return specs[0] if specs else None


def _format_spec(kind: str, schema: dict[str, Any] | None) -> GrammarSpec | None:
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        return GrammarSpec("json_schema", json.dumps(schema or {}, separators=(",", ":")))
    return None


class Generation:
    """One request's run through the engine (its n choices), primed with its first chunk; records metrics."""

    def __init__(
        self,
        stream: AsyncGenerator[tuple[int, GenerationChunk], None],
        first: tuple[int, GenerationChunk],
        n: int,
        task_label: str,
        endpoint: str,
        metrics: Metrics,
        started: float,
    ) -> None:
        self._stream, self._first, self.n = stream, first, n
        self._task_label, self._endpoint, self._metrics = task_label, endpoint, metrics
        self._started, self._last = started, time.perf_counter()
        self._metrics.time_to_first_token.labels(endpoint).observe(self._last - started)
        self.prompt_tokens = first[1].prompt_tokens
        self._completion: dict[int, int] = {}
        self.finish_reasons: dict[int, str] = {}

    @classmethod
    async def start(
        cls,
        engine: EngineClient,
        request: GenerationRequest,
        target: Target,
        endpoint: str,
        metrics: Metrics,
        n: int = 1,
    ) -> Generation:
        """Start the engine's run and wait for its first chunk; an engine error becomes its APIError."""
        started = time.perf_counter()
        stream = engine.generate_choices(request, n)
        try:
            first = await anext(stream)
        except MAPPED_ERRORS as exc:
            await stream.aclose()
            metrics.task_requests.labels(target.model, "rejected").inc()
            raise from_engine(exc, target.model) from None
        except StopAsyncIteration:
            raise APIError(500, "The engine ended the request without output.", type="server_error") from None
        return cls(stream, first, n, target.model, endpoint, metrics, started)

    @property
    def completion_tokens(self) -> int:
        """Completion tokens of all choices."""
        return sum(self._completion.values())

    @property
    def finish_reason(self) -> str | None:
        """Choice 0's finish reason once every choice finished; None while any runs."""
        return self.finish_reasons.get(0) if len(self.finish_reasons) == self.n else None

    async def chunks(self) -> AsyncIterator[tuple[int, GenerationChunk]]:
        """Every (choice index, chunk), the primed first one included; ends when every choice finished."""
        item: tuple[int, GenerationChunk] | None = self._first
        while item is not None:
            self._account(*item)
            yield item
            if len(self.finish_reasons) == self.n:
                return
            item = await anext(self._stream, None)

    async def aclose(self) -> None:
        """Close the engine's generator (aborting unfinished choices) and record the outcome."""
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
        outcome = self.finish_reason or "disconnected"
        self._metrics.observe_finished(
            self._task_label,
            self._endpoint,
            outcome,
            self.prompt_tokens,
            self.completion_tokens,
            time.perf_counter() - self._started,
        )

    def _account(self, index: int, chunk: GenerationChunk) -> None:
        now = time.perf_counter()
        new_tokens = chunk.completion_tokens - self._completion.get(index, 0)
        if new_tokens > 0 and chunk is not self._first[1]:
            self._metrics.inter_token_latency.labels(self._endpoint).observe((now - self._last) / new_tokens)
        self._last = now
        self._completion[index] = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reasons[index] = chunk.finish_reason


@dataclass
class Collected:
    """One choice's whole output, gathered from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


async def collect(run: Generation, model: str) -> list[Collected]:
    """Every choice's output, by index; an engine error raises its APIError. Closes the run."""
    choices = [Collected() for _ in range(run.n)]
    try:
        async for index, chunk in run.chunks():
            choice = choices[index]
            choice.text += chunk.text
            choice.token_ids.extend(chunk.token_ids)
            choice.logprobs.extend(chunk.logprobs or ())
            choice.finish_reason = chunk.finish_reason or choice.finish_reason
    except MAPPED_ERRORS as exc:
        raise from_engine(exc, model) from None
    finally:
        await run.aclose()
    return choices


def sse(payload: str) -> str:
    """One server-sent event carrying `payload`."""
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(error: APIError) -> str:
    """The SSE event of an error that ends a stream."""
    return sse(json.dumps(error.body()))


def usage_of(run: Generation) -> Usage:
    """The usage of a finished run."""
    return Usage(
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        total_tokens=run.prompt_tokens + run.completion_tokens,
    )
