"""Next-token choice per row: penalties, temperature, top-k, top-p, seeded sampling, logprobs.

Logprobs are those of the model's distribution after the presence/frequency penalties and before
temperature and truncation (what vLLM reports by default). Temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from server.engine.types import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class RowState:
    params: SamplingParams
    output: Sequence[int]
    generator: torch.Generator | None


def sample(
    logits: torch.Tensor, rows: Sequence[RowState], token_text: Callable[[int], str]
) -> tuple[list[int], list[TokenLogprob | None]]:
    """logits: [R, vocab] float32 -> the chosen token of each row, and its logprob entry if asked."""
    logits = _apply_penalties(logits, rows)
    greedy = torch.argmax(logits, dim=-1).tolist() if logits.shape[0] else []
    chosen = [greedy[i] if _is_greedy(row.params) else _draw(logits[i], row) for i, row in enumerate(rows)]
    return chosen, [_logprob_entry(logits[i], chosen[i], row, token_text) for i, row in enumerate(rows)]


def _apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    penalised = [i for i, r in enumerate(rows) if r.output and (r.params.presence_penalty or r.params.frequency_penalty)]
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
    return params.temperature <= 0.0 or params.top_k == 1


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
    alternatives = (
        tuple((int(t), token_text(int(t)), float(v)) for v, t in zip(top.values, top.indices)) if top else ()
    )
    return TokenLogprob(token, token_text(token), float(logprobs[token]), alternatives)
