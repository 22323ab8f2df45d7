"""The GPU path: one Triton launch per product for every task slot of a step (SGMV-style).

Both halves are "CSR rows times a gathered dense block": for each active slot j and each CSR row r
of its factor (a singular vector of vt for shrink, an output feature of u for expand),
    out[row, r] (+)= sum over stored e of row r:  value[e] * inp[row, col[e]]     for row in rows_j.
A program owns (slot, block of CSR rows, block of batch rows); it reads its values once for all the
batch rows it holds, accumulates in float32, and is the only writer of its outputs (no atomics).
Slots reach the kernel through a small int64 table of factor addresses, so no factor is copied per
step. Semantics: kernels.reference. Runs under TRITON_INTERPRET=1 on CPU tensors for the tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from kernels import cpu
from kernels.layout import CsrPart, ResidentFactors
from kernels.plan import BatchPlan

BLOCK_R = 16
BLOCK_E = 32
SEGMENT_COLS = 6
"""The Triton segment table (one product: one factor per slot; not the C kernels' slot table), one int64
row per slot: crow address, col address, values address, CSR rows, offset into plan.order, row count."""


# triton ships no type information, so mypy sees @triton.jit as an untyped decorator. Inside the kernel every
# argument that is not a constexpr is a tl.tensor (a pointer or a scalar).
@triton.jit  # type: ignore[untyped-decorator]
def _csr_segments_kernel(
    meta_ptr: tl.tensor,
    order_ptr: tl.tensor,
    inp_ptr: tl.tensor,
    inp_stride: tl.tensor,
    out_ptr: tl.tensor,
    out_stride: tl.tensor,
    ACCUMULATE: tl.constexpr,
    VAL_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_E: tl.constexpr,
    COLS: tl.constexpr,
) -> None:
    meta = meta_ptr + tl.program_id(0) * COLS
    crow_p = tl.load(meta).to(tl.pointer_type(tl.int32))
    col_p = tl.load(meta + 1).to(tl.pointer_type(tl.int32))
    val_p = tl.load(meta + 2).to(tl.pointer_type(VAL_DTYPE))
    num_r = tl.load(meta + 3)
    n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < tl.load(meta + 5)
    rows = tl.load(order_ptr + tl.load(meta + 4) + n, mask=n_ok, other=0).to(tl.int64)
    r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_r
    start = tl.load(crow_p + r, mask=r_ok, other=0)
    length = tl.load(crow_p + r + 1, mask=r_ok, other=0) - start
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for e0 in range(0, tl.max(length, axis=0), BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e[None, :] < length[:, None]
        pos = start[:, None] + e[None, :]
        col = tl.load(col_p + pos, mask=e_ok, other=0)
        val = tl.load(val_p + pos, mask=e_ok, other=0.0).to(tl.float32)
        x_ptrs = inp_ptr + rows[:, None, None] * inp_stride + col[None, :, :]
        x = tl.load(x_ptrs, mask=n_ok[:, None, None] & e_ok[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(x * val[None, :, :], axis=2)
    out_ptrs = out_ptr + rows[:, None] * out_stride + r[None, :]
    mask = n_ok[:, None] & r_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _segments(plan: BatchPlan, parts: Sequence[CsrPart | None]) -> tuple[Tensor, int, int] | None:
    """The segment table for one product: ([S, SEGMENT_COLS] int64 on the batch's device, max CSR rows, max
    slot rows)."""
    table, max_r, max_n = [], 0, 0
    for rows in plan.slots:
        part = parts[rows.slot] if rows.slot < len(parts) else None
        if part is None or part.rows == 0 or part.cols == 0:
            continue
        if part.dense:
            raise ValueError("the Triton path needs CSR factors: pack_factors(..., backend='triton')")
        ptrs = [part.crow.data_ptr(), part.col.data_ptr(), part.values.data_ptr()]
        table.append([*ptrs, part.rows, rows.offset, rows.count])
        max_r, max_n = max(max_r, part.rows), max(max_n, rows.count)
    if not table:
        return None
    return torch.tensor(table, dtype=torch.int64).to(plan.order.device), max_r, max_n


def _launch(plan: BatchPlan, parts: Sequence[CsrPart | None], inp: Tensor, out: Tensor, accumulate: bool) -> None:
    """out[rows_j, :R_j] (+)= CSR_j @ inp[rows_j].T for every slot with a part; one launch."""
    seg = _segments(plan, parts)
    if seg is None:
        return
    table, max_r, max_n = seg
    dtypes = {p.values.dtype for p in parts if p is not None and p.rows and p.cols}
    if len(dtypes) != 1:
        raise ValueError(f"all slots of one product must store one value dtype, got {sorted(map(str, dtypes))}")
    val_dtype = dtypes.pop()
    block_n = min(16, triton.next_power_of_2(max_n))
    grid = (table.shape[0], triton.cdiv(max_r, BLOCK_R), triton.cdiv(max_n, block_n))
    _csr_segments_kernel[grid](
        table, plan.order, inp, inp.stride(0), out, out.stride(0),
        ACCUMULATE=accumulate, VAL_DTYPE=_TL_DTYPES[val_dtype], BLOCK_N=block_n, BLOCK_R=BLOCK_R, BLOCK_E=BLOCK_E,
        COLS=SEGMENT_COLS,
    )  # fmt: skip


def _parts(factors: Sequence[ResidentFactors | None], half: str) -> list[CsrPart | None]:
    return [None if f is None or f.rank == 0 else getattr(f, half) for f in factors]


def shrink(x: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """x: [N, in] -> h: [N, Kmax] float32. Semantics: kernels.reference.shrink."""
    kmax = max((f.rank for f in factors if f is not None), default=0)
    h = torch.zeros(x.shape[0], kmax, dtype=torch.float32, device=x.device)
    _launch(plan, _parts(factors, "vt"), x.contiguous(), h, accumulate=False)
    return h


def expand(y: Tensor, h: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """y: [N, out] += per-slot h[rows, :K] @ u.T, in place. Semantics: kernels.reference.expand."""
    if y.stride(1) != 1:
        raise ValueError("expand needs y with unit stride along its last dimension")
    _launch(plan, _parts(factors, "u"), h.contiguous(), y, accumulate=True)
    return y


def add_delta(y: Tensor, x: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """y[rows of slot j] += delta_j(x[rows of slot j]), in place. Semantics: kernels.reference.add_delta."""
    return expand(y, shrink(x, plan, factors), plan, factors)


def delta_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: BatchPlan, factors: Sequence[ResidentFactors | None]
) -> Tensor:
    """x: [N, in] -> x @ weight.T (+ bias) + each row's delta: [N, out] in x's dtype."""
    return add_delta(F.linear(x, weight, bias), x, plan, factors)


embedding_delta = cpu.embedding_delta
"""The embedding delta is a gather, not a product: the torch ops of the CPU path run on CUDA as well."""
