"""Task deltas as the model consumes them: one task resident, and the batch view of one step.

Three levels of one idea: the artifact (compressor, on disk) -> `ResidentDelta` (one task's delta in
the kernels' layout, on the device) -> `StepDeltas` (the deltas of the tasks in one step, with each
row's slot, ready for `kernels.add_delta` / `kernels.embedding_delta`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from kernels import ResidentFactors


@dataclass(frozen=True)
class ResidentDelta:
    """One version of one task's delta, every module unpacked on the device."""

    task: str
    sha256: str
    factors: Mapping[str, ResidentFactors]
    """2-D deltas by HF tensor name, in the kernels' layout."""
    dense: Mapping[str, torch.Tensor]
    """1-D deltas (norm weights, biases) by HF tensor name, on the device in the activation dtype."""

    @property
    def nbytes(self) -> int:
        """Bytes on the device: every factor and 1-D delta."""
        return sum(f.nbytes for f in self.factors.values()) + sum(
            t.numel() * t.element_size() for t in self.dense.values()
        )


def unpack_artifact(
    task: str, data: bytes, base_dir: Path | None, device: torch.device, dtype: torch.dtype, sha256: str | None = None
) -> ResidentDelta:
    """Validate artifact bytes against the base in `base_dir` (None: against no base) and unpack every
    module into the kernels' layout; `sha256`: the bytes' digest when the caller already checked it
    (else it is computed here). Nothing unchecked is unpacked: load_artifact checks the manifest and
    every stored tensor, and each module's decode checks what it makes (compressor.validate), so a bad
    artifact raises ArtifactError."""
    from compressor import load_artifact

    artifact = load_artifact(data, base_dir)
    factors: dict[str, ResidentFactors] = {}
    dense: dict[str, torch.Tensor] = {}
    for module in artifact.modules():
        if module.kind == "dense":
            dense[module.name] = module.dense().to(device=device, dtype=dtype)
            continue
        u, s, v = module.factors()  # u [out, K], s [K], v [in, K]; a 2-D sparse/full delta is (D, 1, I)
        if s.numel() > 0:
            factors[module.name] = kernels.pack_factors(u, s, v, device=device, dtype=dtype)
    return ResidentDelta(task, sha256 or hashlib.sha256(data).hexdigest(), factors, dense)


class StepDeltas:
    """The deltas of one step: `slots[j]` is the task in slot j; row i uses slot row_slots[i] (-1: none).

    Built once per step, before the forward: its two plans (the rows, which the embedding and every
    linear of every layer reuse; the logit rows, for the LM head) are the step's only `kernels.plan_batch`
    calls."""

    def __init__(
        self, slots: Sequence[ResidentDelta], row_slots: torch.Tensor, logit_rows: torch.Tensor, dtype: torch.dtype
    ) -> None:
        # row_slots: [T] int64; logit_rows: [R] int64 rows whose logits are computed
        self.slots = list(slots)
        self.dtype = dtype
        self.row_slots = row_slots
        self.logit_slots = row_slots[logit_rows]
        self.plan = kernels.plan_batch(row_slots, len(self.slots))
        self.logits_plan = kernels.plan_batch(self.logit_slots, len(self.slots))
        self._dense_cache: dict[tuple[str, bool], torch.Tensor | None] = {}

    def factors(self, name: str) -> list[ResidentFactors | None] | None:
        """Each slot's factors for `name`, or None when no slot has a delta on it."""
        found = [delta.factors.get(name) for delta in self.slots]
        return found if any(f is not None for f in found) else None

    def dense_rows(self, name: str, logits: bool = False) -> torch.Tensor | None:
        """[T, n] (or [R, n] for the logit rows): each row's 1-D delta on `name`, zeros without one."""
        key = (name, logits)
        if key not in self._dense_cache:
            self._dense_cache[key] = self._gather_dense(name, self.logit_slots if logits else self.row_slots)
        return self._dense_cache[key]

    def _gather_dense(self, name: str, row_slots: torch.Tensor) -> torch.Tensor | None:
        found = [delta.dense.get(name) for delta in self.slots]
        present = [t for t in found if t is not None]
        if not present:
            return None
        zeros = torch.zeros_like(present[0])
        table = torch.stack([t if t is not None else zeros for t in found] + [zeros])  # [S + 1, n]
        index = torch.where(row_slots < 0, len(self.slots), row_slots)
        return table[index]
