"""One module's compressed delta as stored: its layout, its tensors and its JSON metadata.

Layouts:
- "svd": s [K] float32, the kept values of U and V (float16, column by column), their drop counts
  per column; the drop masks are regenerated from two 64-bit keys (masks.py), so they cost no bytes.
- "sparse": DARE's kept delta values (float16, row by row), drop counts given as (base, extra):
  rows [0, extra) drop base + 1 entries, the rest drop base; mask regenerated from a key.
- "dense": the delta itself (float32), for 1-D tensors (norm weights, biases).
Values are stored already rescaled by 1/(1 - p), so decoding is a scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.masks import keep_mask, scatter_columns

VALUE_DTYPE = torch.float16


@dataclass(frozen=True)
class ModuleCode:
    name: str
    shape: tuple[int, ...]
    layout: str
    """"svd" | "sparse" | "dense"."""
    tensors: dict[str, torch.Tensor]
    """Stored tensors by role: svd {s, u, v, u_drops, v_drops}; sparse {d}; dense {delta}."""
    meta: dict[str, object] = field(default_factory=dict)
    """JSON-able layout data: mask keys (hex), sparse drop counts, quantisation groups."""

    @property
    def kept(self) -> int:
        """Values kept (the CR denominator): U and V entries, DARE entries, or dense entries."""
        if self.layout == "svd":
            return int(self.tensors["u"].numel() + self.tensors["v"].numel())
        if self.layout == "sparse":
            return int(self.tensors["d"].numel())
        return int(self.tensors["delta"].numel())

    @property
    def rank(self) -> int:
        return int(self.tensors["s"].numel()) if self.layout == "svd" else 0


def drops_tensor(drops: list[int] | tuple[int, ...], rows: int) -> torch.Tensor:
    """Per-column drop counts in the smallest integer type that holds them: [K]."""
    dtype = torch.uint16 if rows < 2**16 else torch.int32
    return torch.tensor(list(drops), dtype=torch.int64).to(dtype)


def decode_factors(code: ModuleCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [out, K], s [K], v [in, K]) float32 with delta = u @ diag(s) @ v.T (contract A)."""
    if code.layout == "svd":
        return _svd_factors(code)
    if code.layout == "sparse":
        d = decode_dense(code)
        return d, torch.ones(d.shape[1]), torch.eye(d.shape[1])
    raise ValueError(f"{code.name}: a {code.layout} delta has no factors; use dense()")


def decode_dense(code: ModuleCode) -> torch.Tensor:
    """The full reconstructed delta, float32, shaped like the base tensor."""
    if code.layout == "dense":
        return code.tensors["delta"].to(torch.float32).reshape(code.shape)
    if code.layout == "sparse":
        rows, cols = code.shape
        keep = keep_mask(int(str(code.meta["key"]), 16), cols, sparse_drops(code))  # [in, out]
        return scatter_columns(code.tensors["d"], keep).t().contiguous()
    u, s, v = _svd_factors(code)
    return (u * s) @ v.t()


def sparse_drops(code: ModuleCode) -> list[int]:
    """DARE's per-row drop counts from their (base, extra) form."""
    base, extra = int(code.meta["drop_base"]), int(code.meta["drop_extra"])
    return [base + 1] * extra + [base] * (code.shape[0] - extra)


def _svd_factors(code: ModuleCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, inp = code.shape
    u_keep = keep_mask(int(str(code.meta["u_key"]), 16), out, code.tensors["u_drops"].long().tolist())
    v_keep = keep_mask(int(str(code.meta["v_key"]), 16), inp, code.tensors["v_drops"].long().tolist())
    u = scatter_columns(code.tensors["u"], u_keep)
    v = scatter_columns(code.tensors["v"], v_keep)
    return u, code.tensors["s"].to(torch.float32), v
