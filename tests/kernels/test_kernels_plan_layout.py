"""BatchPlan grouping and the resident layout (CSR int32, dense fallback)."""

from __future__ import annotations

import pytest
import torch
from kernel_mixes import dense_factors, impart_factors

from kernels import add_delta, pack_factors, plan_batch, stack_factors


def test_plan_groups_rows_by_slot_and_detects_ranges() -> None:
    plan = plan_batch(torch.tensor([1, 1, -1, 0, 2, 0, 1]), 4)
    assert plan.order.tolist() == [3, 5, 0, 1, 6, 4]
    assert plan.seg_starts.tolist() == [0, 2, 5, 6, 6]
    by_slot = {r.slot: r for r in plan.slots}
    assert sorted(by_slot) == [0, 1, 2]
    assert by_slot[2].index is None and (by_slot[2].start, by_slot[2].stop) == (4, 5)
    assert by_slot[0].index.tolist() == [3, 5]
    assert by_slot[1].index.tolist() == [0, 1, 6]


def test_plan_contiguous_slots_are_ranges() -> None:
    plan = plan_batch(torch.tensor([0, 0, 0, 2, 2, -1]), 3)
    assert [(r.slot, r.offset, r.start, r.stop, r.index) for r in plan.slots] == [
        (0, 0, 0, 3, None),
        (2, 3, 3, 5, None),
    ]


def test_plan_rejects_out_of_range_slots() -> None:
    with pytest.raises(ValueError):
        plan_batch(torch.tensor([0, 3]), 3)


def test_pack_roundtrip_and_index_bytes() -> None:
    gen = torch.Generator().manual_seed(5)
    u, s, v = impart_factors(64, 96, 20, gen)
    f = pack_factors(u, s, v)
    assert f.shape == (64, 96) and f.rank == 20
    torch.testing.assert_close(f.dense_delta(), u @ torch.diag(s) @ v.T, rtol=1e-5, atol=1e-6)
    nnz = int((u != 0).sum() + (v != 0).sum())
    assert f.vt.col.dtype == torch.int32 and not f.u.dense
    assert f.nbytes == nnz * 8 + (20 + 1 + 64 + 1) * 4


def test_dense_factors_use_dense_storage() -> None:
    gen = torch.Generator().manual_seed(6)
    f = pack_factors(*dense_factors(16, 24, 4, gen))
    assert f.u.dense and f.vt.dense and f.nbytes == (16 * 4 + 4 * 24) * 4
    # the C kernel's view: vt row-major, u K-major (each column contiguous)
    assert f.vt.values.is_contiguous() and f.u.values.T.is_contiguous() and f.native_kind == 1
    assert pack_factors(*impart_factors(16, 24, 4, gen)).native_kind in (0, 1)


def test_rank_zero_packs() -> None:
    f = pack_factors(torch.zeros(8, 0), torch.zeros(0), torch.zeros(12, 0))
    assert f.rank == 0 and f.shape == (8, 12)
    assert torch.all(f.dense_delta() == 0)


def test_stack_factors_is_the_delta_of_the_stacked_weight() -> None:
    gen = torch.Generator().manual_seed(10)
    outs, inn = (32, 16, 16), 48
    parts = [pack_factors(*impart_factors(32, inn, 7, gen)), None, pack_factors(*impart_factors(16, inn, 4, gen))]
    fused = stack_factors(parts, outs, inn)
    assert fused.shape == (64, inn) and fused.rank == 11
    want = torch.cat([parts[0].dense_delta(), torch.zeros(16, inn), parts[2].dense_delta()])
    torch.testing.assert_close(fused.dense_delta(), want, rtol=1e-5, atol=1e-6)
    x = torch.randn(5, inn, generator=gen)
    plan = plan_batch(torch.tensor([0, 0, -1, 0, 0]), 1)
    y = add_delta(torch.zeros(5, 64), x, plan, [fused])
    torch.testing.assert_close(y, torch.where((plan.row_slots >= 0)[:, None], x @ want.T, 0.0), rtol=1e-4, atol=1e-5)


def test_stack_factors_of_dense_parts_and_all_empty() -> None:
    gen = torch.Generator().manual_seed(11)
    parts = [pack_factors(*dense_factors(8, 12, 3, gen)), pack_factors(*dense_factors(4, 12, 2, gen))]
    fused = stack_factors(parts, (8, 4), 12)
    want = torch.cat([p.dense_delta() for p in parts])
    torch.testing.assert_close(fused.dense_delta(), want, rtol=1e-5, atol=1e-5)
    assert stack_factors([None, None], (8, 4), 12) is None


@pytest.mark.parametrize("row_slots", [[], [-1, -1, -1]])
def test_an_empty_plan_is_a_valid_plan(row_slots: list[int]) -> None:
    """No rows, or no row with a task (a step of base rows only, the logit rows of a chunk-only step):
    the plan is typed and empty, and a product over it leaves y as it was."""
    plan = plan_batch(torch.tensor(row_slots, dtype=torch.int64), 2)
    assert plan.slots == () and plan.order.numel() == 0 and plan.seg_starts.tolist() == [0, 0, 0]
    gen = torch.Generator().manual_seed(3)
    factors = [pack_factors(*impart_factors(8, 6, 3, gen)), None]
    x = torch.randn(len(row_slots), 6, generator=gen)
    y = torch.randn(len(row_slots), 8, generator=gen)
    expected = y.clone()
    add_delta(y, x, plan, factors)
    assert torch.equal(y, expected)
