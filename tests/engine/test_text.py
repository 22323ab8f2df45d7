"""Sampling and incremental detokenisation: what each parameter does, byte-exact streamed text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import NON_FINITE, RowState, Sampled, sample
from server.engine.types import RequestFailedError, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> object:
    return AutoTokenizer.from_pretrained(tiny_model)


def _stream(tokenizer: object, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    ids = tokenizer.encode(text)  # type: ignore[attr-defined]
    detok = IncrementalDetokenizer(tokenizer, [], stop)
    pieces = []
    for token in ids:
        detok.add(token)
        pieces.append(detok.flush(final=False))
        if detok.stopped:
            break
    pieces.append(detok.flush(final=True))
    return pieces, detok


def test_multibyte_utf8_is_streamed_whole(tokenizer: object) -> None:
    text = "héllo wörld 世界 🎉 ok"
    pieces, _ = _stream(tokenizer, text)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(tokenizer.encode("🎉")) > 1  # type: ignore[attr-defined]  # the emoji really spans tokens


def test_stop_string_spanning_tokens_is_withheld_and_cut(tokenizer: object) -> None:
    pieces, detok = _stream(tokenizer, "the model reads a task and writes", stop=("ads a ta",))
    assert detok.stopped
    assert "".join(pieces) == "the model re"
    assert not any("ads" in p for p in pieces)


def test_text_without_stop_is_not_held_back_at_the_end(tokenizer: object) -> None:
    pieces, detok = _stream(tokenizer, "json keys and lists", stop=("lists!",))
    assert not detok.stopped
    assert "".join(pieces) == "json keys and lists"


def _rows(params: SamplingParams, n: int = 1, output: tuple[int, ...] = (), seed: int | None = None) -> list[RowState]:
    return [RowState(params, output, torch.Generator().manual_seed(seed if seed is not None else i)) for i in range(n)]


def _tokens(logits: torch.Tensor, rows: list[RowState]) -> list[int]:
    """The sampled token of every row (each must have succeeded)."""
    out = sample(logits, rows, str)
    assert all(isinstance(o, Sampled) for o in out), out
    return [o.token for o in out]  # type: ignore[union-attr]


def _logits(vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax() -> None:
    logits = _logits()
    best = int(logits.argmax())
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-4)):
        assert _tokens(logits, _rows(params)) == [best]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = _logits().repeat(1, 1)
    params = SamplingParams(temperature=1.5)

    def draw(seed: int) -> list[int]:
        row = RowState(params, (), torch.Generator().manual_seed(seed))
        return [_tokens(logits, [row])[0] for _ in range(20)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_top_k_restricts_samples_to_the_k_best() -> None:
    logits = _logits()
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    row = RowState(SamplingParams(temperature=5.0, top_k=3), (), torch.Generator().manual_seed(0))
    drawn = {_tokens(logits, [row])[0] for _ in range(60)}
    assert drawn <= allowed and len(drawn) > 1


def test_presence_and_frequency_penalties_push_repeated_tokens_down() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 4], logits[0, 6] = 2.0, 1.0
    greedy = SamplingParams(temperature=0.0)
    assert _tokens(logits, _rows(greedy, output=(4,))) == [4]
    assert _tokens(logits, _rows(SamplingParams(temperature=0.0, presence_penalty=1.5), output=(4,))) == [6]
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    assert _tokens(logits, _rows(freq, output=(4,))) == [4]
    assert _tokens(logits, _rows(freq, output=(4, 4))) == [6]


def test_logprobs_report_the_chosen_token_and_top_alternatives() -> None:
    logits = _logits()
    (drawn,) = sample(logits, _rows(SamplingParams(temperature=0.0, logprobs=3)), lambda t: f"<{t}>")
    assert isinstance(drawn, Sampled)
    expected = torch.log_softmax(logits[0], -1)
    entry = drawn.logprob
    assert entry is not None and entry.token_id == drawn.token and entry.token == f"<{drawn.token}>"
    assert abs(entry.logprob - float(expected[drawn.token])) < 1e-6
    assert [t for t, _, _ in entry.top] == torch.topk(expected, 3).indices.tolist()
    (plain,) = sample(logits, _rows(SamplingParams(temperature=0.0)), str)
    assert isinstance(plain, Sampled) and plain.logprob is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300),
        SamplingParams(temperature=1e-30),
        SamplingParams(top_p=1e-300),
        SamplingParams(temperature=1e-300, top_p=1e-300, top_k=3),
        SamplingParams(temperature=2.0, top_p=5e-324),
    ],
)
def test_extreme_but_accepted_parameters_are_well_defined(params: SamplingParams) -> None:
    """Temperatures that overflow a division are greedy; a top_p nothing reaches keeps the top token."""
    logits = _logits()
    assert _tokens(logits.repeat(3, 1), _rows(params, n=3)) == [int(logits.argmax())] * 3


def test_a_row_with_non_finite_logits_fails_alone() -> None:
    logits = _logits().repeat(4, 1)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    rows = _rows(SamplingParams(temperature=0.7, logprobs=2), n=4)
    out = sample(logits, rows, str)
    assert [type(o) for o in out] == [Sampled, RequestFailedError, RequestFailedError, Sampled]
    assert str(out[1]) == NON_FINITE
