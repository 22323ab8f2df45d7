"""plan_batch reads its input to the host exactly once (on a GPU each read is a device sync)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kernels import plan_batch

HOST_READS = {"tolist", "item", "__int__", "__bool__", "__float__", "__index__", "cpu", "numpy"}
"""Tensor methods that copy a value to the host (a sync when the tensor is on a device)."""


class CountHostReads(TorchFunctionMode):
    """Records every host read of a tensor made while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Sequence[type],
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "row_slots",
    [[1, 1, -1, 0, 2, 0, 1], [0, 0, 0, 2, 2, -1], [-1, -1], [], [3, 3, 3, 3]],
)
def test_plan_batch_reads_its_input_to_the_host_once(row_slots: list[int]) -> None:
    with CountHostReads() as counter:
        plan = plan_batch(torch.tensor(row_slots, dtype=torch.int64), 4)
    assert counter.reads == ["tolist"]
    assert plan.seg_starts.tolist()[-1] == plan.order.numel() == sum(1 for s in row_slots if s >= 0)
