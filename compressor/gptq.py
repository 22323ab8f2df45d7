"""GPTQ over ImPart's sparse V factor: quantise V^T [K, in] input column by input column with the
layer's input Hessian H = X^T X, feeding each column's rounding error forward (Frantar et al. 2023).

Zeros stay zero: dropped entries are never stored; the error fed into them is passed on when their
column comes (as SparseGPT does for pruned weights). Each row k (singular vector) keeps its own bit
width, and its groups are 128 consecutive kept values, so the output has exactly the layout of the
round-to-nearest path (quantize.py) and decodes the same way. U stays round-to-nearest: its input
dimension is the rank K, where error feedback has little room to help.
"""

from __future__ import annotations

import numpy as np
import torch

from compressor.quantize import GROUP

DAMP = 0.01
"""Dampening added to H's diagonal, as a share of its mean (GPTQ's default)."""


def inverse_hessian_factor(x: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (X^T X + damp)^-1 from inputs x [T, in] -> [in, in] float64."""
    h = x.double().t() @ x.double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    factor: torch.Tensor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return factor  # torch's stubs type cholesky(..., upper=) as Any


def gptq_rows(
    w: torch.Tensor, keep: torch.Tensor, hinv: torch.Tensor, bits: list[int]
) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """w [R, C] (zeros where not kept), keep [R, C] bool, hinv [C, C] from inverse_hessian_factor,
    bits [R] -> per row: codes of its kept entries in column order, and params [groups, 2] float16."""
    w = (w.double() * keep).clone()
    rows, cols = w.shape
    levels = torch.tensor([2**b - 1 for b in bits], dtype=torch.float64)
    positions = [torch.nonzero(keep[r]).flatten() for r in range(rows)]
    rank = torch.cumsum(keep.long(), dim=1) - 1  # index of each kept entry within its row
    lo, scale = torch.zeros(rows, dtype=torch.float64), torch.ones(rows, dtype=torch.float64)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    params: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    for j in range(cols):
        starting = torch.nonzero(keep[:, j] & (rank[:, j] % GROUP == 0)).flatten().tolist()
        for r in starting:
            group = positions[r][rank[r, j] : rank[r, j] + GROUP]
            lo[r], scale[r] = _group_params(w[r, group], int(levels[r]))
            params[r].append(torch.tensor([lo[r], scale[r]], dtype=torch.float16))
        q = torch.clamp(torch.round((w[:, j] - lo) / scale), min=torch.zeros(rows, dtype=torch.float64), max=levels)
        codes[:, j] = q.to(torch.uint8)
        err = (w[:, j] - torch.where(keep[:, j], q * scale + lo, torch.zeros_like(q))) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
    return [codes[r, positions[r]].numpy() for r in range(rows)], [_stack(p) for p in params]


def _group_params(values: torch.Tensor, levels: int) -> tuple[float, float]:
    """(min, scale) as float16 values, exactly as quantize.quantize rounds them."""
    lo16 = values.min().to(torch.float16)
    scale16 = ((values.max() - values.min()) / levels).to(torch.float16)
    scale = float(scale16) if float(scale16) > 0 else 1.0
    return float(lo16), scale


def _stack(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(params) if params else torch.zeros(0, 2, dtype=torch.float16)
