"""The batch view of one step: which rows belong to which task slot, computed once and reused by every layer."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import accumulate

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
        """Rows of the slot."""
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


def plan_batch(row_slots: Tensor, num_slots: int) -> BatchPlan:
    """Group the rows of a batch by slot, once per step.

    row_slots: [N] int64 (any device), the slot of each row's task, -1 for no task.
    The plan's one host sync is here: row_slots is read to the host once (no sync when it is on the host
    already). The checks and the slots' row ranges come from that copy; `order` and `seg_starts` are
    computed on row_slots' device from the tensor itself, with no further read.
    """
    if row_slots.dim() != 1:
        raise ValueError(f"row_slots must be 1-D, got shape {tuple(row_slots.shape)}")
    host: list[int] = row_slots.tolist()  # the one host sync
    if host and (max(host) >= num_slots or min(host) < -1):
        raise ValueError(f"row_slots must lie in [-1, {num_slots}), got {host}")
    slots64 = row_slots.to(torch.int64)
    has_task = slots64 >= 0
    keys = torch.where(has_task, slots64, num_slots)
    host_order = sorted((i for i, slot in enumerate(host) if slot >= 0), key=host.__getitem__)  # stable, as below
    order = torch.sort(keys, stable=True).indices[: len(host_order)]
    counts = torch.bincount(slots64[has_task], minlength=num_slots)
    seg_starts = torch.zeros(num_slots + 1, dtype=torch.int64, device=row_slots.device)
    seg_starts[1:] = torch.cumsum(counts, 0)
    return BatchPlan(
        row_slots=slots64,
        num_slots=num_slots,
        slots=_slot_rows(order, host_order, _host_seg_starts(host, num_slots)),
        order=order.to(torch.int32),
        seg_starts=seg_starts.to(torch.int32),
    )


def _host_seg_starts(host: list[int], num_slots: int) -> list[int]:
    """seg_starts on the host: [num_slots + 1], rows of slot j at positions [out[j], out[j + 1]) of the order."""
    counts = Counter(host)
    return [0, *accumulate(counts[slot] for slot in range(num_slots))]


def _slot_rows(order: Tensor, host_order: list[int], seg_starts: list[int]) -> tuple[SlotRows, ...]:
    """One SlotRows per non-empty slot; ranges detected so that contiguous rows are taken as views.
    order: [M] int64 on the batch's device, equal to host_order."""
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
