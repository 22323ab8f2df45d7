"""The batch view of one step: which rows belong to which task slot, computed once and reused by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SlotRows:
    """The rows of one slot: a contiguous range [start, stop) when they are one, else an index tensor."""

    slot: int
    offset: int
    """Position of the slot's first row in BatchPlan.order."""
    start: int
    stop: int
    index: Tensor | None
    """[n] int64 row indices, on the batch's device; None when the rows are the range [start, stop)."""

    @property
    def count(self) -> int:
        return self.stop - self.start if self.index is None else int(self.index.numel())

    def take(self, x: Tensor) -> Tensor:
        """x[rows] for x: [N, ...] -> [n, ...] (a view when the rows are contiguous)."""
        return x[self.start : self.stop] if self.index is None else x.index_select(0, self.index)


@dataclass(frozen=True)
class BatchPlan:
    """Which rows of a step's batch belong to which slot (a slot is one task's place in the step)."""

    row_slots: Tensor
    """[N] int64: slot of each row, -1 for a row with no task."""
    num_slots: int
    slots: tuple[SlotRows, ...]
    """The non-empty slots, in slot order."""
    order: Tensor
    """[M] int32: indices of rows that have a slot, grouped by slot (slot order, row order inside)."""
    seg_starts: Tensor
    """[num_slots + 1] int32: rows of slot j are order[seg_starts[j]:seg_starts[j+1]]."""

    @property
    def num_rows(self) -> int:
        return int(self.row_slots.numel())


def plan_batch(row_slots: Tensor, num_slots: int) -> BatchPlan:
    """Group the rows of a batch by slot, once per step.

    row_slots: [N] int64 (any device), the slot of each row's task, -1 for no task.
    The one host sync of the step happens here (reading the segment sizes).
    """
    if row_slots.dim() != 1:
        raise ValueError(f"row_slots must be 1-D, got shape {tuple(row_slots.shape)}")
    slots64 = row_slots.to(torch.int64)
    if slots64.numel() and (int(slots64.max()) >= num_slots or int(slots64.min()) < -1):
        raise ValueError(f"row_slots must lie in [-1, {num_slots}), got {slots64.tolist()}")
    has_task = slots64 >= 0
    keys = torch.where(has_task, slots64, num_slots)
    order = torch.sort(keys, stable=True).indices[: int(has_task.sum())]
    counts = torch.bincount(slots64[has_task], minlength=num_slots)
    seg_starts = torch.zeros(num_slots + 1, dtype=torch.int64, device=row_slots.device)
    seg_starts[1:] = torch.cumsum(counts, 0)
    return BatchPlan(
        row_slots=slots64,
        num_slots=num_slots,
        slots=_slot_rows(order, seg_starts.tolist()),
        order=order.to(torch.int32),
        seg_starts=seg_starts.to(torch.int32),
    )


def _slot_rows(order: Tensor, seg_starts: list[int]) -> tuple[SlotRows, ...]:
    """One SlotRows per non-empty slot; ranges detected so that contiguous rows are taken as views."""
    host_order = order.tolist()
    out: list[SlotRows] = []
    for slot in range(len(seg_starts) - 1):
        lo, hi = seg_starts[slot], seg_starts[slot + 1]
        if hi == lo:
            continue
        first, last = host_order[lo], host_order[hi - 1]
        if last - first == hi - lo - 1:
            out.append(SlotRows(slot, lo, first, last + 1, None))
        else:
            out.append(SlotRows(slot, lo, 0, hi - lo, order[lo:hi]))
    return tuple(out)
