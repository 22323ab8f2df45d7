"""POST /v1/chat/completions: chat template, then one engine run of n choices, collected or streamed as SSE."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import cast

from server.api.errors import MAPPED_ERRORS, bad_request, from_engine
from server.api.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    TopLogprob,
    Usage,
)
from server.api.serving import (
    SSE_DONE,
    EngineClient,
    Generation,
    RequestLimits,
    Target,
    check_chat_size,
    collect,
    sampling_params,
    sse,
    sse_error,
    usage_of,
)
from server.engine.types import GenerationRequest, TokenLogprob
from server.observability.metrics import Metrics

ENDPOINT = "chat"


class ChatServing:
    """Serves chat completions: template, sampling parameters, one engine run, the response."""

    def __init__(self, engine: EngineClient, metrics: Metrics, limits: RequestLimits) -> None:
        self.engine, self.metrics, self.limits = engine, metrics, limits

    async def create(
        self, req: ChatCompletionRequest, target: Target, request_id: str
    ) -> ChatCompletionResponse | AsyncIterator[str]:
        """The response (a ChatCompletionResponse, or SSE text for a stream) of one chat request."""
        check_chat_size(req, self.limits)
        prompt = await asyncio.to_thread(self.prompt_ids, req)
        max_tokens = req.max_completion_tokens or req.max_tokens
        top = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling_params(req, len(prompt), self.engine.max_model_len, max_tokens, top, self.limits, "messages")
        request = GenerationRequest(request_id, target.task, tuple(prompt), params, target.ref)
        run = await Generation.start(self.engine, request, target, ENDPOINT, self.metrics, req.n)
        if req.stream:
            return self._stream(run, target, request_id, req)
        return await self._collect(run, target, request_id, req)

    def prompt_ids(self, req: ChatCompletionRequest) -> list[int]:
        """The base tokenizer's chat template applied to the messages, as token ids."""
        messages = [_template_message(m) for m in req.messages]
        try:
            # with tokenize=False the template's output is the text (transformers types every mode's result)
            text = cast(
                str, self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
        except Exception as exc:  # noqa: BLE001 - a template raises whatever its Jinja code raises
            raise bad_request(f"The chat template rejected the messages: {exc}", "messages") from None
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    async def _collect(
        self, run: Generation, target: Target, request_id: str, req: ChatCompletionRequest
    ) -> ChatCompletionResponse:
        choices = [
            ChatChoice(
                index=i,
                message={"role": "assistant", "content": c.text},
                logprobs=chat_logprobs(c.logprobs) if req.logprobs else None,
                finish_reason=c.finish_reason,
                token_ids=c.token_ids if req.return_token_ids else None,
            )
            for i, c in enumerate(await collect(run, target.model))
        ]
        return ChatCompletionResponse(id=request_id, model=target.model, choices=choices, usage=usage_of(run))

    async def _stream(
        self, run: Generation, target: Target, request_id: str, req: ChatCompletionRequest
    ) -> AsyncIterator[str]:
        created = int(time.time())

        def event(choices: list[ChatStreamChoice], usage: Usage | None = None) -> str:
            chunk = ChatCompletionChunk(
                id=request_id, created=created, model=target.model, choices=choices, usage=usage
            )
            return sse(chunk.model_dump_json(exclude_none=True))

        try:
            for i in range(req.n):
                yield event([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
            async for i, chunk in run.chunks():
                if chunk.text or chunk.logprobs or (req.return_token_ids and chunk.token_ids):
                    logprobs = chat_logprobs(list(chunk.logprobs)) if chunk.logprobs else None
                    ids = list(chunk.token_ids) if req.return_token_ids else None
                    yield event(
                        [
                            ChatStreamChoice(
                                index=i, delta=ChatDelta(content=chunk.text, token_ids=ids), logprobs=logprobs
                            )
                        ]
                    )
                if chunk.finish_reason is not None:
                    yield event([ChatStreamChoice(index=i, delta=ChatDelta(), finish_reason=chunk.finish_reason)])
            if req.include_usage:
                yield event([], usage_of(run))
        except MAPPED_ERRORS as exc:
            yield sse_error(from_engine(exc, target.model))
        finally:
            await run.aclose()
        yield SSE_DONE


def _template_message(message: ChatMessage) -> dict[str, str]:
    """The message as the chat template sees it: role, content as one text, and `name` when given."""
    content = message.content
    text = "".join(part.text for part in content) if isinstance(content, list) else content or ""
    return {"role": message.role, "content": text} | ({"name": message.name} if message.name else {})


def chat_logprobs(tokens: list[TokenLogprob]) -> ChatLogprobs:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""

    def entry(token: str, logprob: float) -> TopLogprob:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(text, lp) for _, text, lp in t.top]} for t in tokens
        ]
    }
