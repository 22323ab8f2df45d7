"""The CPU path: per slot, two int32-CSR products through torch.sparse (MKL), float32 accumulation.

Each slot's rows are taken once (a view when contiguous), shrunk and expanded without leaving the
transposed [K, n] / [out, n] layout, and added into y in place. Semantics: kernels.reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import native
from kernels.layout import NativeKind, ResidentFactors
from kernels.plan import BatchPlan, SlotRows

USE_NATIVE = True
"""Use the C kernel for add_delta when it builds (tests switch it off to check the torch path)."""
NATIVE_MAX_ROWS = 8
"""Slots with this many rows or more go to torch.sparse: measured, MKL's CSR product wins from ~8 rows
(7B 4096x4096 CR 32: 1 slot x 16 rows C 16.7 ms vs MKL 7.4 ms; 4 rows C 3.0 ms vs MKL 4.8 ms)."""
NATIVE_MAX_ROWS_DENSE = 64
"""The same for dense factors (C dot/axpy loops against two small torch GEMMs per slot)."""


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """a: [r, c] CSR or dense float32, b: [c, n] float32 -> [r, n]."""
    return torch.sparse.mm(a, b) if a.layout == torch.sparse_csr else a @ b


def _active(plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> list[tuple[SlotRows, ResidentFactors]]:
    """The (rows, factors) pairs that carry a delta in this step."""
    out = []
    for rows in plan.slots:
        f = factors[rows.slot] if rows.slot < len(factors) else None
        if f is not None and f.rank > 0:
            out.append((rows, f))
    return out


def _shrink_t(x_rows: Tensor, f: ResidentFactors) -> Tensor:
    """x_rows: [n, in] -> h.T: [K, n] float32."""
    return _mm(f.vt_torch, x_rows.float().T)


def _add_rows(y: Tensor, rows: SlotRows, d_t: Tensor) -> None:
    """y[rows] += d_t.T in place; d_t: [out, n] float32."""
    if rows.index is None:
        y[rows.start : rows.stop].add_(d_t.T)
    else:
        y.index_add_(0, rows.index, d_t.T.to(y.dtype))


def shrink(x: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """x: [N, in] -> h: [N, Kmax] float32. Semantics: kernels.reference.shrink."""
    kmax = max((f.rank for f in factors if f is not None), default=0)
    h = torch.zeros(x.shape[0], kmax, dtype=torch.float32, device=x.device)
    for rows, f in _active(plan, factors):
        h_t = _shrink_t(rows.take(x), f)
        if rows.index is None:
            h[rows.start : rows.stop, : f.rank] = h_t.T
        else:
            h[rows.index, : f.rank] = h_t.T
    return h


def expand(y: Tensor, h: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """y: [N, out] += per-slot h[rows, :K] @ u.T, in place. Semantics: kernels.reference.expand."""
    for rows, f in _active(plan, factors):
        h_t = rows.take(h)[:, : f.rank].T.contiguous()
        _add_rows(y, rows, _mm(f.u_torch, h_t))
    return y


def add_delta(y: Tensor, x: Tensor, plan: BatchPlan, factors: Sequence[ResidentFactors | None]) -> Tensor:
    """y[rows of slot j] += delta_j(x[rows of slot j]), in place. Semantics: kernels.reference.add_delta.

    CSR slots with fewer than NATIVE_MAX_ROWS rows go to the C kernel in one call (kernels.native);
    the others (dense storage, many rows: MKL wins there) and every slot when the C kernel is
    unavailable go through torch one slot at a time.
    """
    active = _active(plan, factors)
    small = [(rows, f) for rows, f in active if _native_ok(rows, f)]
    if small and USE_NATIVE and native.add_delta(y, x, plan, small):
        active = [(rows, f) for rows, f in active if not _native_ok(rows, f)]
    for rows, f in active:
        _add_rows(y, rows, _mm(f.u_torch, _shrink_t(rows.take(x), f)))
    return y


def _csr32(f: ResidentFactors) -> bool:
    return f.native_kind == NativeKind.CSR


def _native_ok(rows: SlotRows, f: ResidentFactors) -> bool:
    kind = f.native_kind
    return kind is not None and rows.count < (NATIVE_MAX_ROWS if kind == NativeKind.CSR else NATIVE_MAX_ROWS_DENSE)


def delta_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: BatchPlan, factors: Sequence[ResidentFactors | None]
) -> Tensor:
    """x: [N, in] -> x @ weight.T (+ bias) + each row's delta: [N, out] in x's dtype."""
    return add_delta(F.linear(x, weight, bias), x, plan, factors)


def embedding_delta(
    ids: Tensor,
    plan: BatchPlan,
    factors: Sequence[ResidentFactors | None],
    *,
    dtype: torch.dtype = torch.float32,
    hidden: int | None = None,
) -> Tensor:
    """ids: [N] -> [N, hidden] delta rows in `dtype`. Semantics: kernels.reference.embedding_delta.

    Row i of u is a sparse [K] vector; its delta row is vt.T @ u[ids[i]]. CSR slots go to the C kernel
    in one call (cost per token: nnz of its u row times nnz per vt row); otherwise the rows of u a
    slot needs are gathered (as a small dense block) and multiplied by vt with torch ops.
    """
    width = _embedding_width(factors, hidden)
    out = torch.zeros(ids.shape[0], width, dtype=torch.float32, device=ids.device)
    active = _active(plan, factors)
    csr = [(rows, f) for rows, f in active if _csr32(f)]
    if csr and USE_NATIVE and native.embedding_delta(out, ids, plan, csr):
        active = [(rows, f) for rows, f in active if not _csr32(f)]
    for rows, f in active:
        u_rows = _gather_rows(f, rows.take(ids))
        d_t = _mm_t(f.vt_torch, u_rows)
        _add_rows(out, rows, d_t)
    return out.to(dtype)


def _embedding_width(factors: Sequence[ResidentFactors | None], hidden: int | None) -> int:
    width = next((f.shape[1] for f in factors if f is not None), hidden)
    if width is None:
        raise ValueError("embedding_delta needs hidden= when no slot carries factors")
    return width


def _gather_rows(f: ResidentFactors, ids: Tensor) -> Tensor:
    """[n] token ids -> [n, K] float32 rows of u."""
    if f.u.dense:
        return f.u.values.index_select(0, ids).float()
    row_of, col, val = _csr_entries(f.u.crow, f.u.col, f.u.values, ids)
    out = torch.zeros(ids.numel(), f.rank, dtype=torch.float32, device=ids.device)
    out[row_of, col] = val.float()
    return out


def _csr_entries(crow: Tensor, col: Tensor, values: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The stored entries of CSR rows `rows` ([n] int64): (position in `rows`, column, value), each [P]."""
    crow = crow.long()
    starts, lens = crow[rows], crow[rows + 1] - crow[rows]
    row_of = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), lens)
    first = torch.repeat_interleave(starts - (torch.cumsum(lens, 0) - lens), lens)
    pos = first + torch.arange(row_of.numel(), device=rows.device)
    return row_of, col[pos].long(), values[pos]


def _mm_t(vt: Tensor, u_rows: Tensor) -> Tensor:
    """vt: [K, hidden] (CSR or dense), u_rows: [n, K] -> (u_rows @ vt).T: [hidden, n].

    With vt in CSR, every stored (i, k) of u_rows scales the stored entries of vt's row k: the
    product costs nnz(u_rows) * (nnz per vt row) and never densifies vt.
    """
    if vt.layout != torch.sparse_csr:
        return (u_rows @ vt).T
    i, k = u_rows.nonzero(as_tuple=True)
    pair, col, val = _csr_entries(vt.crow_indices(), vt.col_indices(), vt.values(), k)
    out = torch.zeros(u_rows.shape[0], vt.shape[1], dtype=torch.float32, device=u_rows.device)
    flat = i[pair] * vt.shape[1] + col
    out.view(-1).index_add_(0, flat, val.float() * u_rows[i, k][pair])
    return out.T
