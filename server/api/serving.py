"""Serving logic shared by the OpenAI endpoints; knows the engine and the protocol, not FastAPI.

A request's life: resolve the task (X-Task, else `model`), check the key's scope and that the task
exists, build SamplingParams, start the engine's generator and pull its first chunk (so every engine
error becomes an HTTP status before any byte is sent), then collect or stream the chunks.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from server.api.errors import APIError, bad_request, forbidden, from_engine, model_not_found, registry_unavailable
from server.api.protocol import ChatCompletionRequest, ContentPart, SamplingFields, Usage
from server.auth import Principal
from server.config import Settings
from server.engine.types import (
    EngineError,
    GenerationChunk,
    GenerationRequest,
    RegistryUnavailableError,
    SamplingParams,
    TaskRef,
)
from server.observability.metrics import Metrics
from server.registry import InvalidTaskNameError


class EngineClient(Protocol):
    """The part of contract D's Engine that serving uses."""

    base_name: str
    max_model_len: int
    tokenizer: Any

    @property
    def ready(self) -> bool: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    def stats(self) -> Any: ...


class TaskLookup(Protocol):
    def lookup(self, task: str) -> TaskRef | None: ...

    def tasks(self) -> list[TaskRef]: ...


@dataclass(frozen=True)
class Target:
    """What a request runs against: a task's delta, or the base alone (task None)."""

    task: str | None
    model: str
    """The model name the response reports."""
    ref: TaskRef | None = None
    """The task's version, resolved once here; the engine serves exactly this version."""


def resolve_target(header_task: str | None, model: str, base_name: str, principal: Principal,
                   tasks: TaskLookup) -> Target:
    """X-Task wins; else `model` as `task`, `base:task` or the base itself; scope, then existence and the
    current version, looked up once for the whole request (503 registry_unavailable when the task is not
    in the last known index and the registry cannot be reached)."""
    task = header_task.strip() if header_task and header_task.strip() else _task_of_model(model, base_name)
    if task is None:
        return Target(None, base_name)
    if not principal.may_use(task):
        raise forbidden(f"This API key may not use the task `{task}`.")
    try:
        found = tasks.lookup(task)
    except InvalidTaskNameError:
        found = None
    except RegistryUnavailableError:
        raise registry_unavailable() from None
    if found is None:
        raise model_not_found(task)
    return Target(task, task, found)


def _task_of_model(model: str, base_name: str) -> str | None:
    if model in ("", base_name):
        return None
    if model.startswith(base_name + ":"):
        return model[len(base_name) + 1:] or None
    return model


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on request fields whose cost the caller controls (each a setting)."""

    max_stop_strings: int
    max_stop_chars: int
    max_stop_token_ids: int
    max_prompt_chars: int
    max_messages: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(settings.max_stop_strings, settings.max_stop_chars, settings.max_stop_token_ids,
                   settings.max_prompt_chars, settings.max_messages)


def check_chat_size(req: ChatCompletionRequest, limits: RequestLimits) -> None:
    """400 before the chat template runs when the messages are too many or their text too long."""
    if len(req.messages) > limits.max_messages:
        raise bad_request(f"At most {limits.max_messages} messages are allowed; got {len(req.messages)}.", "messages")
    chars = sum(_chars(m.content) for m in req.messages)
    if chars > limits.max_prompt_chars:
        raise bad_request(f"The messages hold {chars} characters; at most {limits.max_prompt_chars} are allowed.",
                          "messages")


def _chars(content: str | list[ContentPart] | None) -> int:
    if isinstance(content, list):
        return sum(len(part.text) for part in content)
    return len(content or "")


def check_prompt_size(prompt: str | list[str] | list[int] | list[list[int]], max_model_len: int,
                      limits: RequestLimits) -> None:
    """400 before tokenizing when a text prompt is too long, or a token prompt longer than the context."""
    one = isinstance(prompt, str) or bool(prompt) and isinstance(prompt[0], int)
    items: list[Any] = [prompt] if one else list(prompt)
    if sum(len(item) for item in items if isinstance(item, str)) > limits.max_prompt_chars:
        raise bad_request(f"The prompt has more than {limits.max_prompt_chars} characters.", "prompt")
    if any(isinstance(item, list) and len(item) >= max_model_len for item in items):
        raise bad_request(f"The prompt has at least {max_model_len} tokens; this model's context is "
                          f"{max_model_len}.", "prompt")


def sampling_params(req: SamplingFields, prompt_len: int, max_model_len: int, max_tokens: int | None,
                    logprobs: int | None, limits: RequestLimits) -> SamplingParams:
    """The engine's SamplingParams for an OpenAI request; 400 naming the parameter when unusable."""
    if req.n != 1:
        raise bad_request("Only n=1 is supported.", "n")
    check_limits(req, limits)
    room = max_model_len - prompt_len
    if room < 1:
        raise bad_request(f"The prompt has {prompt_len} tokens; the context holds {max_model_len}.", "messages")
    if max_tokens is not None and max_tokens > room:
        raise bad_request(f"max_tokens={max_tokens} exceeds the {room} tokens left in the context "
                          f"({max_model_len}) after the prompt ({prompt_len}).", "max_tokens")
    return SamplingParams(
        temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
        max_tokens=max_tokens or room, stop=req.stop_strings(), stop_token_ids=tuple(req.stop_token_ids or ()),
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logprobs=logprobs, ignore_eos=req.ignore_eos,
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


class Generation:
    """One request's run through the engine, primed with its first chunk; records metrics as it goes."""

    def __init__(self, stream: AsyncIterator[GenerationChunk], first: GenerationChunk, task_label: str,
                 endpoint: str, metrics: Metrics, started: float) -> None:
        self._stream, self._first = stream, first
        self._task_label, self._endpoint, self._metrics = task_label, endpoint, metrics
        self._started, self._last = started, time.perf_counter()
        self._metrics.time_to_first_token.labels(endpoint).observe(self._last - started)
        self.prompt_tokens, self.completion_tokens = first.prompt_tokens, first.completion_tokens
        self.finish_reason: str | None = None

    @classmethod
    async def start(cls, engine: EngineClient, request: GenerationRequest, target: Target, endpoint: str,
                    metrics: Metrics) -> Generation:
        started = time.perf_counter()
        stream = engine.generate(request)
        try:
            first = await anext(stream)
        except EngineError as exc:
            await stream.aclose()
            metrics.task_requests.labels(target.model, "rejected").inc()
            raise from_engine(exc, target.model) from None
        except StopAsyncIteration:
            raise APIError(500, "The engine ended the request without output.", type="server_error") from None
        return cls(stream, first, target.model, endpoint, metrics, started)

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Every chunk, the primed first one included; ends after the chunk with a finish_reason."""
        chunk: GenerationChunk | None = self._first
        while chunk is not None:
            self._account(chunk)
            yield chunk
            if chunk.finish_reason is not None:
                return
            chunk = await anext(self._stream, None)

    async def aclose(self) -> None:
        """Close the engine's generator (aborting it when unfinished) and record the outcome."""
        with anyio.CancelScope(shield=True):
            await self._stream.aclose()
        outcome = self.finish_reason or "disconnected"
        self._metrics.observe_finished(self._task_label, self._endpoint, outcome, self.prompt_tokens,
                                       self.completion_tokens, time.perf_counter() - self._started)

    def _account(self, chunk: GenerationChunk) -> None:
        now = time.perf_counter()
        new_tokens = chunk.completion_tokens - self.completion_tokens
        if new_tokens > 0 and chunk is not self._first:
            self._metrics.inter_token_latency.labels(self._endpoint).observe((now - self._last) / new_tokens)
        self._last = now
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        self.finish_reason = chunk.finish_reason


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_error(error: APIError) -> str:
    return sse(json.dumps(error.body()))


def usage_of(run: Generation) -> Usage:
    return Usage(prompt_tokens=run.prompt_tokens, completion_tokens=run.completion_tokens,
                 total_tokens=run.prompt_tokens + run.completion_tokens)
