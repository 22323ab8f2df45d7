"""Checks a GenerationRequest must pass before it is queued (each failure is HTTP 400 with its param)."""

from __future__ import annotations

from server.engine.types import GenerationRequest, InvalidRequestError

MAX_LOGPROBS = 20


def validate_request(request: GenerationRequest, max_model_len: int, vocab_size: int) -> None:
    prompt = request.prompt_token_ids
    if not prompt:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt has {len(prompt)} tokens; this model's context is {max_model_len}", "prompt"
        )
    if any(t < 0 or t >= vocab_size for t in prompt):
        raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    if any(t < 0 or t >= vocab_size for t in request.params.stop_token_ids):
        raise InvalidRequestError(f"stop token ids must lie in [0, {vocab_size})", "stop_token_ids")
    if any(t < 0 or t >= vocab_size or not -100.0 <= b <= 100.0 for t, b in request.params.logit_bias):
        raise InvalidRequestError(
            f"logit_bias keys must be token ids in [0, {vocab_size}) and its values in [-100, 100]", "logit_bias"
        )
    _check_params(request)


def _check_params(request: GenerationRequest) -> None:
    p = request.params
    checks = [
        (p.temperature >= 0.0, "temperature", "temperature must be >= 0"),
        (0.0 < p.top_p <= 1.0, "top_p", "top_p must be in (0, 1]"),
        (p.top_k >= 0, "top_k", "top_k must be >= 0 (0: no cut)"),
        (p.max_tokens >= 1, "max_tokens", "max_tokens must be >= 1"),
        (-2.0 <= p.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be in [-2, 2]"),
        (-2.0 <= p.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be in [-2, 2]"),
        (p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS, "logprobs", f"logprobs must be in [0, {MAX_LOGPROBS}]"),
    ]
    for ok, param, message in checks:
        if not ok:
            raise InvalidRequestError(message, param)
