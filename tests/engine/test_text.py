"""Sampling and incremental detokenisation: what each parameter does, byte-exact streamed text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.sampler import RowState, sample
from server.engine.types import SamplingParams


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


def _logits(vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_top_k_1_and_tiny_top_p_pick_the_argmax() -> None:
    logits = _logits()
    best = int(logits.argmax())
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-4)):
        assert sample(logits, _rows(params), str)[0] == [best]


def test_seeded_sampling_is_reproducible_and_seed_dependent() -> None:
    logits = _logits().repeat(1, 1)
    params = SamplingParams(temperature=1.5)

    def draw(seed: int) -> list[int]:
        row = RowState(params, (), torch.Generator().manual_seed(seed))
        return [sample(logits, [row], str)[0][0] for _ in range(20)]

    assert draw(11) == draw(11)
    assert draw(11) != draw(12)


def test_top_k_restricts_samples_to_the_k_best() -> None:
    logits = _logits()
    allowed = set(torch.topk(logits[0], 3).indices.tolist())
    row = RowState(SamplingParams(temperature=5.0, top_k=3), (), torch.Generator().manual_seed(0))
    drawn = {sample(logits, [row], str)[0][0] for _ in range(60)}
    assert drawn <= allowed and len(drawn) > 1


def test_presence_and_frequency_penalties_push_repeated_tokens_down() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 4], logits[0, 6] = 2.0, 1.0
    greedy = SamplingParams(temperature=0.0)
    assert sample(logits, _rows(greedy, output=(4,)), str)[0] == [4]
    assert sample(logits, _rows(SamplingParams(temperature=0.0, presence_penalty=1.5), output=(4,)), str)[0] == [6]
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.6)
    assert sample(logits, _rows(freq, output=(4,)), str)[0] == [4]
    assert sample(logits, _rows(freq, output=(4, 4)), str)[0] == [6]


def test_logprobs_report_the_chosen_token_and_top_alternatives() -> None:
    logits = _logits()
    tokens, entries = sample(logits, _rows(SamplingParams(temperature=0.0, logprobs=3)), lambda t: f"<{t}>")
    expected = torch.log_softmax(logits[0], -1)
    entry = entries[0]
    assert entry is not None and entry.token_id == tokens[0] and entry.token == f"<{tokens[0]}>"
    assert abs(entry.logprob - float(expected[tokens[0]])) < 1e-6
    assert [t for t, _, _ in entry.top] == torch.topk(expected, 3).indices.tolist()
    assert sample(logits, _rows(SamplingParams(temperature=0.0)), str)[1] == [None]
