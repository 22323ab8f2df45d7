"""Batched multi-task sparse delta products: one op per product, dispatched by device.

Every op has a twin in kernels.reference (the spec, plain float32 PyTorch); docs/kernels.md describes
the layout and the measurements. This package imports nothing else of deltaserve.

    factors = pack_factors(u, s, v, device=dev)        # one task, one matrix -> ResidentFactors
    plan = plan_batch(row_slots, num_slots)            # once per step: row -> slot (-1: no task)
    y = delta_linear(x, weight, bias, plan, [factors_of_slot_0, None, ...])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from kernels import cpu, reference
from kernels.layout import ResidentFactors, pack_factors, stack_factors
from kernels.plan import BatchPlan, plan_batch

__all__ = [
    "BatchPlan",
    "ResidentFactors",
    "add_delta",
    "delta_linear",
    "embedding_delta",
    "expand",
    "pack_factors",
    "plan_batch",
    "reference",
    "shrink",
    "stack_factors",
]

Factors = Sequence[ResidentFactors | None]


class _Backend(Protocol):
    """What each device path implements (the modules kernels.cpu and kernels.triton_ops)."""

    def shrink(self, x: Tensor, plan: BatchPlan, factors: Factors) -> Tensor: ...

    def expand(self, y: Tensor, h: Tensor, plan: BatchPlan, factors: Factors) -> Tensor: ...

    def add_delta(self, y: Tensor, x: Tensor, plan: BatchPlan, factors: Factors) -> Tensor: ...

    def delta_linear(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, plan: BatchPlan, factors: Factors
    ) -> Tensor: ...

    def embedding_delta(
        self, ids: Tensor, plan: BatchPlan, factors: Factors, *, dtype: torch.dtype = ..., hidden: int | None = ...
    ) -> Tensor: ...


def _backend(t: Tensor) -> _Backend:
    """kernels.triton_ops for CUDA tensors, kernels.cpu otherwise."""
    if t.device.type == "cuda":
        from kernels import triton_ops

        return triton_ops
    return cpu


def shrink(x: Tensor, plan: BatchPlan, factors: Factors) -> Tensor:
    """h = s * (x[rows] @ v) per slot.

    Semantics: kernels.reference.shrink.  x: [N, in] float32/bfloat16 -> h: [N, Kmax] float32, zero
    past each slot's rank and on rows with no task.
    """
    return _backend(x).shrink(x, plan, factors)


def expand(y: Tensor, h: Tensor, plan: BatchPlan, factors: Factors) -> Tensor:
    """y[rows] += h[rows, :K] @ u.T per slot, in place.

    Semantics: kernels.reference.expand.  y: [N, out] float32/bfloat16, h: [N, Kmax] float32.
    """
    return _backend(y).expand(y, h, plan, factors)


def add_delta(y: Tensor, x: Tensor, plan: BatchPlan, factors: Factors) -> Tensor:
    """y[rows of slot j] += expand_j(shrink_j(x[rows of slot j])), in place; returns y.

    Semantics: kernels.reference.add_delta.  y: [N, out], x: [N, in]; float32 accumulation.
    """
    return _backend(x).add_delta(y, x, plan, factors)


def delta_linear(x: Tensor, weight: Tensor, bias: Tensor | None, plan: BatchPlan, factors: Factors) -> Tensor:
    """x @ weight.T (+ bias) plus each row's task delta.

    Semantics: kernels.reference.delta_linear.  x: [N, in], weight: [out, in], bias: [out] | None ->
    [N, out] in x's dtype.
    """
    return _backend(x).delta_linear(x, weight, bias, plan, factors)


def embedding_delta(
    ids: Tensor, plan: BatchPlan, factors: Factors, *, dtype: torch.dtype = torch.float32, hidden: int | None = None
) -> Tensor:
    """Row i: (u[ids[i]] * s) @ v.T of its slot's factors; zeros for rows with no task / None.

    Semantics: kernels.reference.embedding_delta.  ids: [N] int64 -> [N, hidden] in `dtype`.
    `hidden` is needed only when no slot carries factors.
    """
    return _backend(ids).embedding_delta(ids, plan, factors, dtype=dtype, hidden=hidden)
