"""The resident layout of one task's delta on one matrix: two CSR matrices with int32 indices.

delta = u @ diag(s) @ v.T is kept as
    vt = (v * s).T   [K, in]   one CSR row per singular vector (s folded into the values)
    u                [out, K]  one CSR row per output feature
so that both halves are the same product, "CSR rows times a dense activation block":
    shrink:  h.T = vt @ x.T        expand:  y.T += u @ h.T
The Triton path reads the same (crow, col, values) arrays. A factor denser than DENSE_ABOVE is kept
dense instead (CSR loses to a dense GEMM there; e.g. LowRank deltas, and ImPart's kept vectors on small
models). A dense u is stored K-major (its [out, K] tensor is a transposed view of a contiguous [K, out]),
so the C kernel's expand runs over contiguous columns. docs/kernels.md has the numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from typing import Literal

import torch
from torch import Tensor

DENSE_ABOVE = 0.25
"""Density above which a factor is stored dense."""


class NativeKind(IntEnum):
    """How the C kernel reads one resident delta (ResidentFactors.native_kind). The one definition:
    kernels.native compiles these values into kernels/csrc/delta_cpu.c as KIND_CSR and KIND_DENSE."""

    CSR = 0
    """Both factors CSR, int32 indices, float32 values."""
    DENSE = 1
    """Both factors dense float32: vt row-major, u K-major."""


@dataclass(frozen=True)
class CsrPart:
    """One factor in CSR (or dense when `dense` is set): rows x cols."""

    rows: int
    cols: int
    crow: Tensor
    """[rows + 1] int32 row pointers (empty when dense)."""
    col: Tensor
    """[nnz] int32 column indices (empty when dense)."""
    values: Tensor
    """[nnz] values, or [rows, cols] when dense (row-major, or column-major when packed K-major)."""
    dense: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.values))

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def as_torch(self) -> Tensor:
        """A torch tensor of shape [rows, cols]: sparse CSR (sharing storage) or the dense values."""
        if self.dense:
            return self.values
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse_csr_tensor(
                self.crow, self.col, self.values, (self.rows, self.cols), check_invariants=False
            )

    def to_dense(self) -> Tensor:
        """[rows, cols] float32 dense copy (for tests and reconstruction)."""
        return self.as_torch().to_dense().float() if not self.dense else self.values.float()


def _dense_storage(mat: Tensor, column_major: bool) -> Tensor:
    """mat itself, contiguous; or, column_major, a [rows, cols] view of a contiguous [cols, rows]."""
    return mat.T.contiguous().T if column_major else mat.contiguous()


def pack_csr(
    mat: Tensor, *, device: torch.device, dtype: torch.dtype, allow_dense: bool, column_major: bool = False
) -> CsrPart:
    """Pack a dense-with-zeros matrix [rows, cols] into CsrPart (dense when allowed and denser than DENSE_ABOVE;
    column_major then stores the dense values column by column)."""
    nnz = int(torch.count_nonzero(mat))
    return _pack(mat, nnz, device=device, dtype=dtype, allow_dense=allow_dense, column_major=column_major)


def _pack(
    mat: Tensor, nnz: int, *, device: torch.device, dtype: torch.dtype, allow_dense: bool, column_major: bool
) -> CsrPart:
    """mat [rows, cols], dense or sparse COO with nnz stored entries, as a CsrPart (the DENSE_ABOVE rule)."""
    rows, cols = int(mat.shape[0]), int(mat.shape[1])
    if allow_dense and rows * cols and nnz / (rows * cols) > DENSE_ABOVE:
        dense = (mat.to_dense() if mat.is_sparse else mat).to(device=device, dtype=dtype)
        return CsrPart(rows, cols, _empty(device), _empty(device), _dense_storage(dense, column_major), True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = mat.to_sparse_csr()
    return CsrPart(
        rows,
        cols,
        csr.crow_indices().to(device=device, dtype=torch.int32),
        csr.col_indices().to(device=device, dtype=torch.int32),
        csr.values().to(device=device, dtype=dtype),
        False,
    )


def _empty(device: torch.device) -> Tensor:
    """[0] int32: the index arrays of a dense-stored factor."""
    return torch.empty(0, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class ResidentFactors:
    """One task's delta of one matrix [out, in], resident in the kernel layout."""

    vt: CsrPart
    """[K, in]: (v * s).T."""
    u: CsrPart
    """[out, K]."""
    vt_torch: Tensor
    """vt as a torch tensor (CSR or dense), built once for the CPU path."""
    u_torch: Tensor
    """u as a torch tensor (CSR or dense), built once for the CPU path."""

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.rows, self.vt.cols)

    @property
    def rank(self) -> int:
        return self.vt.rows

    @property
    def nbytes(self) -> int:
        return self.vt.nbytes + self.u.nbytes

    @property
    def device(self) -> torch.device:
        return self.vt.values.device

    @cached_property
    def native_kind(self) -> NativeKind | None:
        """How the C kernel reads this delta (NativeKind); None when it cannot (mixed storage, other
        dtypes, not on the CPU)."""
        vt, u = self.vt, self.u
        if self.device.type != "cpu" or vt.values.dtype != torch.float32 or u.values.dtype != torch.float32:
            return None
        if not (vt.dense or u.dense):
            return NativeKind.CSR
        if vt.dense and u.dense and vt.values.is_contiguous() and u.values.T.is_contiguous():
            return NativeKind.DENSE
        return None

    @cached_property
    def addresses(self) -> tuple[int, int, int, int, int, int, int]:
        """(vt crow, vt col, vt values, K, u crow, u col, u values): the C kernel's view of this delta
        (the first columns of its slot table, kernels.native.SLOT_COLUMNS)."""
        vt, u = self.vt, self.u
        return (
            vt.crow.data_ptr(), vt.col.data_ptr(), vt.values.data_ptr(), self.rank,
            u.crow.data_ptr(), u.col.data_ptr(), u.values.data_ptr(),
        )  # fmt: skip

    def dense_delta(self) -> Tensor:
        """[out, in] float32: u @ diag(s) @ v.T, reconstructed from the layout."""
        return self.u.to_dense() @ self.vt.to_dense()


def pack_factors(
    u: Tensor,
    s: Tensor,
    v: Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: Literal["cpu", "triton"] | None = None,
) -> ResidentFactors:
    """Pack factors (contract A: u [out, K], s [K], v [in, K], float32) into the resident layout.

    backend (default: "triton" on CUDA, else "cpu") decides the storage:
      cpu:    float32 values whatever dtype says (torch's CPU CSR product has no bfloat16 kernel, and
              upcasting per call costs more than it saves); dense storage above DENSE_ABOVE density.
      triton: values in dtype; always CSR.
    """
    if u.dim() != 2 or v.dim() != 2 or s.dim() != 1 or not (u.shape[1] == v.shape[1] == s.shape[0]):
        raise ValueError(f"factors must be u [out, K], s [K], v [in, K]; got {u.shape}, {s.shape}, {v.shape}")
    dev = torch.device(device)
    on_cpu = (backend or ("triton" if dev.type == "cuda" else "cpu")) == "cpu"
    store = torch.float32 if on_cpu else dtype
    vt = pack_csr((v.float() * s.float()).T.contiguous(), device=dev, dtype=store, allow_dense=on_cpu)
    up = pack_csr(u.float().contiguous(), device=dev, dtype=store, allow_dense=on_cpu, column_major=True)
    return ResidentFactors(vt=vt, u=up, vt_torch=vt.as_torch(), u_torch=up.as_torch())


def stack_factors(
    factors: Sequence[ResidentFactors | None], out_features: Sequence[int], in_features: int
) -> ResidentFactors | None:
    """The delta of the row-stacked weight [W_0; W_1; ...] (e.g. fused q/k/v or gate/up), packed once.

    vt is the row-concatenation of every part's vt ([sum K, in]); u is block-diagonal
    ([sum out, sum K]). One shrink and one expand then serve every part of a shared input: fewer,
    larger calls. factors[i] None (or rank 0) means part i carries no delta. Returns None when
    no part does. Storage follows the first present part (device, value dtype, dense fallback).
    """
    present = [(i, f) for i, f in enumerate(factors) if f is not None and f.rank > 0]
    if not present:
        return None
    ranks = [0 if f is None else f.rank for f in factors]
    row_off = [sum(out_features[:i]) for i in range(len(factors))]
    k_off = [sum(ranks[:i]) for i in range(len(factors))]
    vt_entries = [_coo(f.vt, k_off[i], 0) for i, f in present]
    u_entries = [_coo(f.u, row_off[i], k_off[i]) for i, f in present]
    first = present[0][1]
    like, allow_dense = first.vt, _allows_dense(first)
    vt = _from_coo(vt_entries, (sum(ranks), in_features), like, allow_dense)
    u = _from_coo(u_entries, (sum(out_features), sum(ranks)), like, allow_dense, column_major=True)
    return ResidentFactors(vt=vt, u=u, vt_torch=vt.as_torch(), u_torch=u.as_torch())


def _allows_dense(f: ResidentFactors) -> bool:
    """CPU-backend storage (float32 values) may fall back to dense; Triton storage never does."""
    return f.device.type == "cpu" and f.vt.values.dtype == torch.float32


def _coo(part: CsrPart, row_off: int, col_off: int) -> tuple[Tensor, Tensor]:
    """([2, nnz] int64 offset indices, [nnz] values) of one part."""
    coo = part.as_torch().to_sparse(layout=torch.sparse_coo).coalesce()
    idx = coo.indices() + torch.tensor([[row_off], [col_off]], device=coo.device)
    return idx, coo.values()


def _from_coo(
    entries: list[tuple[Tensor, Tensor]],
    shape: tuple[int, int],
    like: CsrPart,
    allow_dense: bool,
    column_major: bool = False,
) -> CsrPart:
    """The parts' (indices, values) entries as one CsrPart of `shape`, stored like `like` (device, dtype)."""
    idx = torch.cat([e[0] for e in entries], 1)
    vals = torch.cat([e[1] for e in entries])
    mat = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=False).coalesce()
    device, dtype = like.values.device, like.values.dtype
    return _pack(mat, mat._nnz(), device=device, dtype=dtype, allow_dense=allow_dense, column_major=column_major)
