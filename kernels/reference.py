"""The spec: every kernels op in plain float32 PyTorch, one task slot at a time.

Fast paths (kernels.cpu, kernels.triton_ops) must agree with these functions to float tolerance; the
tests compare them on random inputs across task mixes. Nothing here is tuned for speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.plan import BatchPlan, plan_batch

__all__ = [
    "ReferenceFactors",
    "add_delta",
    "delta_linear",
    "embedding_delta",
    "expand",
    "pack_factors",
    "plan_batch",
    "shrink",
]


@dataclass(frozen=True)
class ReferenceFactors:
    """One task's delta of one matrix as plain dense factors: delta = u @ diag(s) @ v.T."""

    u: Tensor
    """[out, K] float32."""
    s: Tensor
    """[K] float32."""
    v: Tensor
    """[in, K] float32."""

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.u.shape[0]), int(self.v.shape[0]))

    @property
    def rank(self) -> int:
        return int(self.s.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.u, self.s, self.v))


def pack_factors(
    u: Tensor, s: Tensor, v: Tensor, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ReferenceFactors:
    """Keep the factors as given (float32; `dtype` is accepted for signature parity and ignored)."""
    _check_factors(u, s, v)
    return ReferenceFactors(u.float().to(device), s.float().to(device), v.float().to(device))


def _check_factors(u: Tensor, s: Tensor, v: Tensor) -> None:
    if u.dim() != 2 or v.dim() != 2 or s.dim() != 1:
        raise ValueError(f"factors must be u [out, K], s [K], v [in, K]; got {u.shape}, {s.shape}, {v.shape}")
    if not (u.shape[1] == v.shape[1] == s.shape[0]):
        raise ValueError(f"rank mismatch: u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)}")


def _slot_index(plan: BatchPlan, slot: int) -> Tensor:
    """[n] int64 rows of one slot."""
    return (plan.row_slots == slot).nonzero().squeeze(1)


def _max_rank(factors: Sequence[ReferenceFactors | None]) -> int:
    return max((f.rank for f in factors if f is not None), default=0)


def shrink(x: Tensor, plan: BatchPlan, factors: Sequence[ReferenceFactors | None]) -> Tensor:
    """The first half of every slot's delta.

    Semantics:
        h = zeros(N, Kmax, float32)                    # Kmax = largest rank among factors
        for j, f in enumerate(factors):                # f None: slot j has no delta here
            rows = (plan.row_slots == j)
            h[rows, :f.rank] = (x[rows].float() @ f.v) * f.s
    x: [N, in] float32 or bfloat16.  Returns h: [N, Kmax] float32 (zeros outside each slot's rank
    and on rows with no task).
    """
    h = torch.zeros(x.shape[0], _max_rank(factors), dtype=torch.float32, device=x.device)
    for slot, f in enumerate(factors):
        if f is None or f.rank == 0:
            continue
        rows = _slot_index(plan, slot)
        h[rows, : f.rank] = (x[rows].float() @ f.v) * f.s
    return h


def expand(y: Tensor, h: Tensor, plan: BatchPlan, factors: Sequence[ReferenceFactors | None]) -> Tensor:
    """The second half: add every slot's delta into y, in place.

    Semantics:
        for j, f in enumerate(factors):
            rows = (plan.row_slots == j)
            y[rows] = (y[rows].float() + h[rows, :f.rank] @ f.u.T).to(y.dtype)
    y: [N, out] float32 or bfloat16 (updated in place and returned); h: [N, Kmax] float32 from shrink.
    """
    for slot, f in enumerate(factors):
        if f is None or f.rank == 0:
            continue
        rows = _slot_index(plan, slot)
        y[rows] = (y[rows].float() + h[rows, : f.rank] @ f.u.T).to(y.dtype)
    return y


def add_delta(y: Tensor, x: Tensor, plan: BatchPlan, factors: Sequence[ReferenceFactors | None]) -> Tensor:
    """y[rows of slot j] += delta_j applied to x[rows of slot j], in place.

    Semantics:
        expand(y, shrink(x, plan, factors), plan, factors)
    y: [N, out], x: [N, in], both float32 or bfloat16.  Returns y.
    """
    return expand(y, shrink(x, plan, factors), plan, factors)


def delta_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, plan: BatchPlan, factors: Sequence[ReferenceFactors | None]
) -> Tensor:
    """The base product for every row plus each row's task delta.

    Semantics:
        y = x.float() @ weight.float().T (+ bias.float())
        add_delta(y, x, plan, factors)
        return y.to(x.dtype)
    x: [N, in], weight: [out, in], bias: [out] or None.  Returns [N, out] in x's dtype.
    """
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return add_delta(y, x, plan, factors).to(x.dtype)


def embedding_delta(
    ids: Tensor,
    plan: BatchPlan,
    factors: Sequence[ReferenceFactors | None],
    *,
    dtype: torch.dtype = torch.float32,
    hidden: int | None = None,
) -> Tensor:
    """The embedding rows' delta of each row's task.

    Semantics:
        out = zeros(N, hidden)
        for j, f in enumerate(factors):
            rows = (plan.row_slots == j)
            out[rows] = (f.u[ids[rows]] * f.s) @ f.v.T
        return out.to(dtype)
    ids: [N] int64 token ids; factors are those of "model.embed_tokens.weight" ([vocab, hidden]).
    Returns [N, hidden] in `dtype` (zeros on rows with no task or no delta); `hidden` is needed only
    when no slot carries factors.
    """
    width = next((f.shape[1] for f in factors if f is not None), hidden)
    if width is None:
        raise ValueError("embedding_delta needs hidden= when no slot carries factors")
    out = torch.zeros(ids.shape[0], width, dtype=torch.float32, device=ids.device)
    for slot, f in enumerate(factors):
        if f is None or f.rank == 0:
            continue
        rows = _slot_index(plan, slot)
        out[rows] = (f.u[ids[rows]] * f.s) @ f.v.T
    return out.to(dtype)
