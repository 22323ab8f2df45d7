"""Checks a GenerationRequest must pass before it is queued (each failure is HTTP 400 with its param).

This module is the one definition of every bound on a request's sampling fields: the engine refuses a
request outside them whoever built it, and the HTTP protocol's fields (server/api/protocol.py) declare
the same constants, so the OpenAPI schema shows them and a bad value is refused before any work.
"""

from __future__ import annotations

from server.engine.types import GenerationRequest, InvalidRequestError

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.0, 2.0
"""`temperature` lies in [TEMPERATURE_MIN, TEMPERATURE_MAX] (0: greedy)."""
TOP_P_MIN, TOP_P_MAX = 0.0, 1.0
"""`top_p` lies in (TOP_P_MIN, TOP_P_MAX]: the lower end is open."""
TOP_K_MIN = 0
"""`top_k` is at least TOP_K_MIN (0: no cut)."""
MAX_TOKENS_MIN = 1
"""`max_tokens` is at least MAX_TOKENS_MIN; a prompt must leave that much room in the context."""
PENALTY_MIN, PENALTY_MAX = -2.0, 2.0
"""`presence_penalty` and `frequency_penalty` lie in [PENALTY_MIN, PENALTY_MAX]."""
MAX_LOGPROBS = 20
"""`logprobs` (completions) and `top_logprobs` (chat) lie in [0, MAX_LOGPROBS]."""
LOGIT_BIAS_MIN, LOGIT_BIAS_MAX = -100.0, 100.0
"""Each `logit_bias` value lies in [LOGIT_BIAS_MIN, LOGIT_BIAS_MAX]."""


def context_room(prompt_len: int, max_model_len: int) -> int:
    """Tokens the context leaves for output after a prompt of `prompt_len` tokens; the prompt fits
    when the room is at least MAX_TOKENS_MIN."""
    return max_model_len - prompt_len


def validate_request(request: GenerationRequest, max_model_len: int, vocab_size: int) -> None:
    """Raise InvalidRequestError naming the field when the request cannot run. `vocab_size` is the
    model's (its embedding and logits rows): every token id must index them."""
    prompt = request.prompt_token_ids
    if not prompt:
        raise InvalidRequestError("the prompt is empty", "prompt")
    if context_room(len(prompt), max_model_len) < MAX_TOKENS_MIN:
        raise InvalidRequestError(
            f"the prompt has {len(prompt)} tokens; this model's context is {max_model_len}", "prompt"
        )
    if any(t < 0 or t >= vocab_size for t in prompt):
        raise InvalidRequestError(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    if any(t < 0 or t >= vocab_size for t in request.params.stop_token_ids):
        raise InvalidRequestError(f"stop token ids must lie in [0, {vocab_size})", "stop_token_ids")
    if any(t < 0 or t >= vocab_size or not LOGIT_BIAS_MIN <= b <= LOGIT_BIAS_MAX for t, b in request.params.logit_bias):
        raise InvalidRequestError(
            f"logit_bias keys must be token ids in [0, {vocab_size}) and its values in "
            f"[{LOGIT_BIAS_MIN:g}, {LOGIT_BIAS_MAX:g}]",
            "logit_bias",
        )
    _check_params(request)


def _check_params(request: GenerationRequest) -> None:
    p = request.params
    checks = [
        (
            TEMPERATURE_MIN <= p.temperature <= TEMPERATURE_MAX,
            "temperature",
            f"temperature must be in [{TEMPERATURE_MIN:g}, {TEMPERATURE_MAX:g}]",
        ),
        (TOP_P_MIN < p.top_p <= TOP_P_MAX, "top_p", f"top_p must be in ({TOP_P_MIN:g}, {TOP_P_MAX:g}]"),
        (p.top_k >= TOP_K_MIN, "top_k", f"top_k must be >= {TOP_K_MIN} (0: no cut)"),
        (p.max_tokens >= MAX_TOKENS_MIN, "max_tokens", f"max_tokens must be >= {MAX_TOKENS_MIN}"),
        _penalty(p.presence_penalty, "presence_penalty"),
        _penalty(p.frequency_penalty, "frequency_penalty"),
        (
            p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS,
            "logprobs",
            f"logprobs must be in [0, {MAX_LOGPROBS}]",
        ),
    ]
    for ok, param, message in checks:
        if not ok:
            raise InvalidRequestError(message, param)


def _penalty(value: float, param: str) -> tuple[bool, str, str]:
    return PENALTY_MIN <= value <= PENALTY_MAX, param, f"{param} must be in [{PENALTY_MIN:g}, {PENALTY_MAX:g}]"
