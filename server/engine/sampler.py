"""Next-token choice per row: grammar mask, logit bias, penalties, temperature, top-k, top-p, seeds, logprobs.

A constrained row's logits are masked by its own grammar matcher (server/engine/grammar.py), then its
logit bias is added, before penalties and temperature; other rows are untouched.

Logprobs are those of the model's distribution after the presence/frequency penalties and before
temperature and truncation (what vLLM reports by default). Every accepted parameter is well defined:
a temperature below SAMPLING_EPS is greedy (dividing by it would overflow), and a top_p so small that
no token reaches it keeps the most likely one. A row whose logits are not finite, or whose draw fails,
gets a RequestFailedError of its own; the other rows are sampled as usual.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import xgrammar as xgr

from server.engine.grammar import mask_rows
from server.engine.types import RequestFailedError, SamplingParams, TokenLogprob

log = logging.getLogger("deltaserve.engine")
SAMPLING_EPS = 1e-5
"""Temperatures below this are greedy (as in vLLM): logits / 1e-300 overflow to inf, softmax to NaN."""
NON_FINITE = "The model produced non-finite values (NaN or infinity) for this request; no token was sampled."
SAMPLING_FAILED = "The engine could not sample a token for this request."
GRAMMAR_FAILED = "The grammar of this request's response format failed; no token was sampled."


@dataclass(frozen=True)
class RowState:
    """What sampling one row needs of its request."""

    params: SamplingParams
    output: Sequence[int]
    generator: torch.Generator | None
    matcher: xgr.GrammarMatcher | None = None
    """The row's grammar parse state when its output is constrained."""


@dataclass(frozen=True)
class Sampled:
    """One row's chosen token."""

    token: int
    logprob: TokenLogprob | None
    """The token's logprob entry when the request asked for logprobs."""


def sample(
    logits: torch.Tensor, rows: Sequence[RowState], token_text: Callable[[int], str]
) -> list[Sampled | RequestFailedError]:
    """logits: [R, vocab] float32 -> each row's chosen token and logprob entry, or the error of that row alone."""
    finite = torch.isfinite(logits).all(dim=-1).tolist() if logits.shape[0] else []
    logits, grammar_failed = _constrain(logits, rows)
    logits = _apply_penalties(logits, rows)
    greedy = torch.argmax(logits, dim=-1).tolist() if logits.shape[0] else []
    out: list[Sampled | RequestFailedError] = []
    for i, row in enumerate(rows):
        if not finite[i]:
            out.append(RequestFailedError(NON_FINITE))
            continue
        if i in grammar_failed:
            out.append(RequestFailedError(GRAMMAR_FAILED))
            continue
        try:
            token = greedy[i] if _is_greedy(row.params) else _draw(logits[i], row)
            out.append(Sampled(token, _logprob_entry(logits[i], token, row, token_text)))
        except Exception:
            log.exception("sampling failed for one row; only its request ends")
            out.append(RequestFailedError(SAMPLING_FAILED))
    return out


def _constrain(logits: torch.Tensor, rows: Sequence[RowState]) -> tuple[torch.Tensor, set[int]]:
    """logits: [R, vocab] -> a copy with each constrained row masked by its grammar and each biased row's
    logit bias added (the input itself when no row has either), and the rows whose grammar failed or left
    no token allowed."""
    matchers = {i: r.matcher for i, r in enumerate(rows) if r.matcher is not None}
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    if not matchers and not biased:
        return logits, set()
    logits = logits.clone()
    failed = mask_rows(logits, matchers) if matchers else set()
    for i in biased:
        ids, biases = zip(*rows[i].params.logit_bias)
        logits[i, list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    if matchers:
        allowed = torch.isfinite(logits[sorted(matchers)]).any(dim=-1).tolist()
        failed |= {i for i, ok in zip(sorted(matchers), allowed) if not ok}
    return logits, failed


def _apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    penalised = [
        i for i, r in enumerate(rows) if r.output and (r.params.presence_penalty or r.params.frequency_penalty)
    ]
    if not penalised:
        return logits
    logits = logits.clone()
    for i in penalised:
        p = rows[i].params
        counts = torch.bincount(torch.tensor(rows[i].output, dtype=torch.int64), minlength=logits.shape[1])
        counts = counts[: logits.shape[1]].to(logits.device, logits.dtype)
        logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < SAMPLING_EPS or params.top_k == 1


def _draw(logits: torch.Tensor, row: RowState) -> int:
    """logits: [vocab] -> one token id drawn with the row's temperature, top-k, top-p and generator."""
    p = row.params
    scaled = logits / p.temperature
    if 0 < p.top_k < scaled.shape[0]:
        kth = torch.topk(scaled, p.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if p.top_p < 1.0:
        scaled = _top_p(scaled, p.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=row.generator))


def _top_p(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    values, order = torch.sort(scaled, descending=True)
    cumulative = torch.softmax(values, dim=-1).cumsum(-1)
    drop_sorted = cumulative - torch.softmax(values, dim=-1) >= top_p
    drop_sorted[0] = False  # the most likely token always survives, however small top_p is
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))


def _logprob_entry(
    logits: torch.Tensor, token: int, row: RowState, token_text: Callable[[int], str]
) -> TokenLogprob | None:
    k = row.params.logprobs
    if k is None:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k) if k > 0 else None
    alternatives = (  # a token its grammar masked (logprob -inf) is no alternative
        tuple((int(t), token_text(int(t)), float(v)) for v, t in zip(top.values, top.indices) if v > -math.inf)
        if top
        else ()
    )
    return TokenLogprob(token, token_text(token), float(logprobs[token]), alternatives)
