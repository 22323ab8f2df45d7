"""The SVD of one delta: full (torch.linalg.svd) or randomised (torch.svd_lowrank) when only the
top K vectors are kept; on the GPU when one is given. Always returns float32 on the CPU."""

from __future__ import annotations

from typing import Literal

import torch

SvdMode = Literal["auto", "full", "lowrank"]
OVERSAMPLE = 16
POWER_ITERS = 4
MIN_LOWRANK_DIM = 256


def use_lowrank(shape: tuple[int, int], k: int, mode: SvdMode) -> bool:
    """Randomised SVD pays when K is well under the full rank of a large matrix."""
    if mode != "auto":
        return mode == "lowrank"
    r = min(shape)
    return r >= MIN_LOWRANK_DIM and k + OVERSAMPLE <= r // 3


def top_svd(
    delta: torch.Tensor, k: int, mode: SvdMode = "auto", device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k singular triplets of delta [out, in]: u [out, k], s [k] (descending), v [in, k]."""
    a = delta.to(device=device, dtype=torch.float32)
    if k == 0:
        return delta.new_zeros(delta.shape[0], 0), delta.new_zeros(0), delta.new_zeros(delta.shape[1], 0)
    if use_lowrank((int(delta.shape[0]), int(delta.shape[1])), k, mode):
        u, s, v = _lowrank(a, k, seed)
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        v = vh.mT
    return _cpu(u[:, :k]), _cpu(s[:k]), _cpu(v[:, :k])


def _lowrank(a: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.svd_lowrank draws from the global RNG: fork it so results depend on `seed` only."""
    devices = [a.device] if a.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        q = min(k + OVERSAMPLE, *a.shape)
        return torch.svd_lowrank(a, q=q, niter=POWER_ITERS)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.to(device="cpu", dtype=torch.float32).contiguous()
