"""The reference (the spec) against the plain definition: merged weights W + u diag(s) v^T per task."""

from __future__ import annotations

import pytest
import torch
from kernel_mixes import impart_factors, make_mix

from kernels import reference as ref


def _merged_rows(x: torch.Tensor, w: torch.Tensor, deltas: list, row_slots: torch.Tensor) -> torch.Tensor:
    """Row by row: x[i] @ (W + delta of row i's task).T."""
    rows = []
    for i, slot in enumerate(row_slots.tolist()):
        weight = w if slot < 0 or deltas[slot] is None else w + deltas[slot]
        rows.append(x[i] @ weight.T)
    return torch.stack(rows)


@pytest.mark.parametrize("mix", ["one", "distinct", "none", "shuffled"])
def test_reference_delta_linear_equals_merged_weights(mix: str) -> None:
    gen = torch.Generator().manual_seed(1)
    out, inn, slots = 24, 40, 3
    raw = [impart_factors(out, inn, k, gen) for k in (5, 0, 9)]
    deltas = [u @ torch.diag(s) @ v.T if s.numel() else None for u, s, v in raw]
    factors = [ref.pack_factors(*f) for f in raw]
    m = make_mix(mix, 11, slots, gen)
    x, w = torch.randn(11, inn, generator=gen), torch.randn(out, inn, generator=gen)
    got = ref.delta_linear(x, w, None, ref.plan_batch(m.row_slots, slots), factors)
    torch.testing.assert_close(got, _merged_rows(x, w, deltas, m.row_slots), rtol=1e-5, atol=1e-5)


def test_reference_embedding_delta_equals_merged_table_rows() -> None:
    gen = torch.Generator().manual_seed(2)
    vocab, hidden = 50, 16
    u, s, v = impart_factors(vocab, hidden, 6, gen)
    ids = torch.randint(0, vocab, (7,), generator=gen)
    row_slots = torch.tensor([0, -1, 1, 0, 0, -1, 1])
    plan = ref.plan_batch(row_slots, 2)
    got = ref.embedding_delta(ids, plan, [ref.pack_factors(u, s, v), None])
    want = torch.where((row_slots == 0)[:, None], (u @ torch.diag(s) @ v.T)[ids], 0.0)
    torch.testing.assert_close(got, want)


def test_reference_shrink_zero_pads_past_each_slot_rank() -> None:
    gen = torch.Generator().manual_seed(3)
    factors = [ref.pack_factors(*impart_factors(8, 12, k, gen)) for k in (2, 5)]
    x = torch.randn(4, 12, generator=gen)
    h = ref.shrink(x, ref.plan_batch(torch.tensor([0, 1, -1, 0]), 2), factors)
    assert h.shape == (4, 5)
    assert torch.all(h[[0, 3], 2:] == 0) and torch.all(h[2] == 0)
    assert torch.all(h[1] != 0)


def test_reference_bf16_activations_return_bf16() -> None:
    gen = torch.Generator().manual_seed(4)
    f = ref.pack_factors(*impart_factors(8, 12, 3, gen))
    x = torch.randn(3, 12, generator=gen).bfloat16()
    w = torch.randn(8, 12, generator=gen).bfloat16()
    y = ref.delta_linear(x, w, None, ref.plan_batch(torch.zeros(3, dtype=torch.int64), 1), [f])
    assert y.dtype == torch.bfloat16


def test_embedding_delta_needs_hidden_without_factors() -> None:
    plan = ref.plan_batch(torch.tensor([0, -1]), 1)
    with pytest.raises(ValueError, match="hidden"):
        ref.embedding_delta(torch.tensor([1, 2]), plan, [None])
    assert ref.embedding_delta(torch.tensor([1, 2]), plan, [None], hidden=5).shape == (2, 5)
