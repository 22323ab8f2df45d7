"""The Triton path against the reference, run by Triton's interpreter on CPU tensors (small shapes).

Skipped when triton is not importable. On a CUDA machine the same kernels run compiled in
test_triton_on_cuda_matches_reference.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "kernels.triton_ops" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from kernel_mixes import MIX_NAMES, dense_factors, impart_factors, make_mix, seed_of

from kernels import (
    pack_factors,
    plan_batch,
    triton_ops,
)
from kernels import reference as ref

RANKS = (5, 0, 11, None, 3)


def _factor_sets(out: int, inn: int, gen: torch.Generator, dtype: torch.dtype, device: str) -> tuple[list, list]:
    raw = [None if k is None else impart_factors(out, inn, k, gen) for k in RANKS]
    raw[-1] = dense_factors(out, inn, 3, gen)
    fast = [None if r is None else pack_factors(*r, device=device, dtype=dtype, backend="triton") for r in raw]
    slow = [None if r is None else ref.pack_factors(*r) for r in raw]
    return fast, slow


def _check_add_delta(mix: str, n: int, shape: tuple[int, int], dtype: torch.dtype, device: str) -> None:
    gen = torch.Generator().manual_seed(seed_of(mix, n, shape, dtype))
    fast, slow = _factor_sets(*shape, gen, dtype, device)
    m = make_mix(mix, n, len(RANKS), gen)
    x = torch.randn(n, shape[1], generator=gen).to(dtype)
    poison = (torch.randn(n, shape[0], generator=gen) * 100).to(dtype)
    want = ref.add_delta(poison.clone(), x, ref.plan_batch(m.row_slots, m.num_slots), slow)
    plan = plan_batch(m.row_slots.to(device), m.num_slots)
    got = triton_ops.add_delta(poison.clone().to(device), x.to(device), plan, fast).cpu()
    assert got.dtype == dtype
    atol = (1e-4 if dtype == torch.float32 else 2e-2) * (float(want.float().abs().max()) + 1.0)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("mix", MIX_NAMES)
def test_triton_add_delta_matches_reference_fp32(mix: str) -> None:
    for n, shape in ((1, (24, 40)), (20, (40, 24))):
        _check_add_delta(mix, n, shape, torch.float32, "cpu")


@pytest.mark.parametrize("mix", ["distinct", "skewed"])
def test_triton_add_delta_matches_reference_bf16(mix: str) -> None:
    _check_add_delta(mix, 19, (16, 40), torch.bfloat16, "cpu")


def test_triton_shrink_zero_pads_past_rank_and_on_rows_without_task() -> None:
    gen = torch.Generator().manual_seed(7)
    fast, slow = _factor_sets(16, 24, gen, torch.float32, "cpu")
    rs = torch.tensor([2, -1, 0, 4, 2, 1, 3])
    x = torch.randn(7, 24, generator=gen)
    h = triton_ops.shrink(x, plan_batch(rs, 5), fast)
    assert h.shape == (7, 11)
    assert torch.all(h[1] == 0) and torch.all(h[2, 5:] == 0) and torch.all(h[3, 3:] == 0)
    torch.testing.assert_close(h, ref.shrink(x, ref.plan_batch(rs, 5), slow), rtol=0, atol=1e-5)


def test_triton_shrink_then_expand_match_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    fast, slow = _factor_sets(16, 24, gen, torch.float32, "cpu")
    m = make_mix("shuffled", 13, len(RANKS), gen)
    x = torch.randn(13, 24, generator=gen)
    h = triton_ops.shrink(x, plan_batch(m.row_slots, m.num_slots), fast)
    torch.testing.assert_close(h, ref.shrink(x, ref.plan_batch(m.row_slots, m.num_slots), slow), rtol=0, atol=1e-5)
    y = torch.randn(13, 16, generator=gen)
    got = triton_ops.expand(y.clone(), h, plan_batch(m.row_slots, m.num_slots), fast)
    torch.testing.assert_close(got, ref.expand(y.clone(), h, ref.plan_batch(m.row_slots, m.num_slots), slow))


def test_triton_rejects_dense_storage() -> None:
    gen = torch.Generator().manual_seed(9)
    f = pack_factors(*dense_factors(8, 8, 4, gen))
    with pytest.raises(ValueError, match="CSR"):
        triton_ops.add_delta(torch.zeros(2, 8), torch.zeros(2, 8), plan_batch(torch.tensor([0, 0]), 1), [f])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mix", MIX_NAMES)
def test_triton_on_cuda_matches_reference(mix: str, dtype: torch.dtype) -> None:
    for n in (1, 16, 300):
        _check_add_delta(mix, n, (112, 48), dtype, "cuda")
