"""Pydantic models of the OpenAI protocol subset deltaserve speaks (requests and responses).

Requests are strict about what they accept: a field the server does not honour is refused (HTTP 400
`unsupported_parameter`) rather than ignored, a field sent as `null` counts as absent, every string
must be valid Unicode (no lone surrogates) and numbers must be finite.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from typing_extensions import TypedDict  # pydantic needs this one on Python < 3.12

from server.engine.validation import (
    MAX_LOGPROBS,
    MAX_TOKENS_MIN,
    PENALTY_MAX,
    PENALTY_MIN,
    TEMPERATURE_MAX,
    TEMPERATURE_MIN,
    TOP_K_MIN,
    TOP_P_MAX,
    TOP_P_MIN,
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The range of a signed 64-bit integer: request seeds and the admin API's mask seeds."""


class OpenAIModel(BaseModel):
    """Base of response bodies: fields the server does not know are dropped."""

    model_config = ConfigDict(extra="ignore")


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields forbidden, `null` as absent, valid Unicode, finite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data: object) -> object:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, value: object) -> object:
        if _has_lone_surrogate(value):
            raise ValueError("holds a lone surrogate: not valid Unicode")
        return value


def _has_lone_surrogate(value: object) -> bool:
    """True when a string in `value` (a string or a list of them, nested) cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, (list, tuple)):
        return any(_has_lone_surrogate(item) for item in value)
    return False


class StreamOptions(RequestModel):
    """`stream_options`: whether the stream ends with a usage chunk."""

    include_usage: bool = False


class JsonSchemaFormat(RequestModel):
    """`response_format.json_schema`: the schema the output must validate against."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON schema; absent or `{}` allows any JSON value."""
    strict: bool | None = None
    """Accepted; the output always follows the schema strictly."""


class ResponseFormat(RequestModel):
    """`response_format`: free text, any JSON object, or JSON that validates against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("`json_schema` is required with type `json_schema`, and only with it")
        return self


class SamplingFields(RequestModel):
    """Fields that chat and completion requests share; vLLM-style extras `top_k`, `ignore_eos`, ..."""

    model: str
    max_tokens: int | None = Field(None, ge=MAX_TOKENS_MIN)
    temperature: float = Field(1.0, ge=TEMPERATURE_MIN, le=TEMPERATURE_MAX)
    top_p: float = Field(1.0, gt=TOP_P_MIN, le=TOP_P_MAX)
    top_k: int = Field(0, ge=TOP_K_MIN)
    n: int = Field(1, ge=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(0.0, ge=PENALTY_MIN, le=PENALTY_MAX)
    frequency_penalty: float = Field(0.0, ge=PENALTY_MIN, le=PENALTY_MAX)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    """Accepted as caller metadata; not used."""
    return_token_ids: bool = False
    """Extension (as in vLLM): each choice also carries the generated token ids."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string) -> bias added to its logit; the engine refuses a bias outside
    [LOGIT_BIAS_MIN, LOGIT_BIAS_MAX] or an id outside the vocabulary, naming `logit_bias`."""
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None
    """Extension (as in vLLM): the output must match this regular expression."""
    guided_choice: list[str] | None = Field(None, min_length=1)
    """Extension (as in vLLM): the output must be exactly one of these strings."""

    def stop_strings(self) -> tuple[str, ...]:
        """The stop strings as a tuple (none, one or several)."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ContentPart(RequestModel):
    """A text part of a message's content; other kinds (images, audio, files) are refused."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    """One chat message; its content as text or text parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingFields):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=MAX_TOKENS_MIN)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(SamplingFields):
    """The body of POST /v1/completions (one prompt: text or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None


class Usage(OpenAIModel):
    """Token counts of one request (all its choices)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatDelta(OpenAIModel):
    """The new part of a streamed chat message."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    token_ids: list[int] | None = None


class TopLogprob(TypedDict):
    """One token of chat `logprobs`: its text, logprob and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """A sampled token of chat `logprobs`, with its top alternatives."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    content: list[ChatTokenLogprob]


class CompletionLogprobs(TypedDict):
    """OpenAI legacy `logprobs`: parallel lists of tokens, their logprobs, top alternatives, offsets."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ChatChoice(OpenAIModel):
    """One choice of a chat completion."""

    index: int = 0
    message: dict[str, str]
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None
    token_ids: list[int] | None = None


class ChatStreamChoice(OpenAIModel):
    """One choice's part of a chat stream chunk."""

    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class CompletionChoice(OpenAIModel):
    """One choice of a completion (or its part of a stream chunk)."""

    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


def new_id(prefix: str) -> str:
    """A fresh response id such as `chatcmpl-<hex>`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(OpenAIModel):
    """A whole chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatCompletionChunk(OpenAIModel):
    """One SSE chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None


class CompletionResponse(OpenAIModel):
    """A whole completion, or one SSE chunk of a streamed one."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(OpenAIModel):
    """One model of GET /v1/models: the base, or a task whose parent is the base."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None


class ModelList(OpenAIModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
