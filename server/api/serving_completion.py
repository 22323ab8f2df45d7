"""POST /v1/completions: one prompt (text or token ids), one engine run of n choices, collected or streamed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from server.api.errors import MAPPED_ERRORS, bad_request, from_engine, unsupported_parameter
from server.api.protocol import CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, Usage
from server.api.serving import (
    SSE_DONE,
    EngineClient,
    Generation,
    RequestLimits,
    Target,
    check_prompt_size,
    collect,
    sampling_params,
    sse,
    sse_error,
    usage_of,
)
from server.engine.types import GenerationRequest, TokenLogprob
from server.observability.metrics import Metrics

ENDPOINT = "completions"


class CompletionServing:
    """Serves completions: the prompt's token ids, sampling parameters, one engine run, the response."""

    def __init__(self, engine: EngineClient, metrics: Metrics, limits: RequestLimits) -> None:
        self.engine, self.metrics, self.limits = engine, metrics, limits

    async def create(
        self, req: CompletionRequest, target: Target, request_id: str
    ) -> CompletionResponse | AsyncIterator[str]:
        """The response (a CompletionResponse, or SSE text for a stream) of one completion request."""
        if req.echo:
            raise unsupported_parameter("echo")
        if req.suffix:
            raise unsupported_parameter("suffix")
        check_prompt_size(req.prompt, self.engine.max_model_len, self.limits)
        prompt = await asyncio.to_thread(self.prompt_ids, req.prompt)
        params = sampling_params(
            req, len(prompt), self.engine.max_model_len, req.max_tokens, req.logprobs, self.limits, "prompt"
        )
        request = GenerationRequest(request_id, target.task, tuple(prompt), params, target.ref)
        run = await Generation.start(self.engine, request, target, ENDPOINT, self.metrics, req.n)
        if req.stream:
            return self._stream(run, target, request_id, req)
        return await self._collect(run, target, request_id, req)

    def prompt_ids(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[int]:
        """Token ids of the one prompt: text is encoded with the base tokenizer, ids pass through (the
        engine's validation refuses an empty prompt and ids outside the model's vocabulary)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(self.engine.tokenizer.encode(prompt, add_special_tokens=False))
        ids = [t for t in prompt if isinstance(t, int)]
        if len(ids) != len(prompt):
            raise bad_request("Only one prompt per request is supported.", "prompt")
        return ids

    async def _collect(
        self, run: Generation, target: Target, request_id: str, req: CompletionRequest
    ) -> CompletionResponse:
        choices = [
            CompletionChoice(
                index=i,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=completion_logprobs(c.logprobs, 0) if req.logprobs is not None else None,
                token_ids=c.token_ids if req.return_token_ids else None,
            )
            for i, c in enumerate(await collect(run, target.model))
        ]
        return CompletionResponse(id=request_id, model=target.model, choices=choices, usage=usage_of(run))

    async def _stream(
        self, run: Generation, target: Target, request_id: str, req: CompletionRequest
    ) -> AsyncIterator[str]:
        created, offsets = int(time.time()), [0] * req.n

        def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            body = CompletionResponse(id=request_id, created=created, model=target.model, choices=choices, usage=usage)
            return sse(body.model_dump_json(exclude_none=True))

        try:
            async for i, chunk in run.chunks():
                logprobs = completion_logprobs(list(chunk.logprobs), offsets[i]) if chunk.logprobs else None
                offsets[i] += len(chunk.text)
                ids = list(chunk.token_ids) if req.return_token_ids else None
                if chunk.text or chunk.finish_reason is not None or logprobs or ids:
                    yield event(
                        [
                            CompletionChoice(
                                index=i,
                                text=chunk.text,
                                logprobs=logprobs,
                                token_ids=ids,
                                finish_reason=chunk.finish_reason,
                            )
                        ]
                    )
            if req.include_usage:
                yield event([], usage_of(run))
        except MAPPED_ERRORS as exc:
            yield sse_error(from_engine(exc, target.model))
        finally:
            await run.aclose()
        yield SSE_DONE


def completion_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    """OpenAI legacy `logprobs`: parallel lists of tokens, their logprobs, top alternatives, offsets."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{text: lp for _, text, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
