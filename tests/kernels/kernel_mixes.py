"""Random ImPart-like factors and task mixes shared by the kernels tests."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor


def seed_of(*parts: object) -> int:
    """A stable seed per test case (str hashes vary between runs)."""
    return zlib.crc32(repr(parts).encode())


def sparse_vectors(rows: int, k: int, drop: Tensor, gen: torch.Generator) -> Tensor:
    """[rows, k]: column j keeps rows - floor(rows * drop[j]) random entries, rescaled by 1/(1-drop[j])."""
    out = torch.randn(rows, k, generator=gen)
    n_drop = torch.floor(rows * drop.double()).long()
    rank_in_column = torch.rand(rows, k, generator=gen).argsort(0).argsort(0)
    out[rank_in_column < n_drop] = 0.0
    return out / (1.0 - drop).clamp_min(1e-3)


Factors = tuple[Tensor, Tensor, Tensor]


def impart_factors(out: int, inn: int, k: int, gen: torch.Generator, low: float = 0.6, high: float = 0.97) -> Factors:
    """u [out, k], s [k], v [in, k] like ImPart: drop ratio rising from low to high along k (sparse: CSR)."""
    drop = torch.linspace(low, high, k) if k > 1 else torch.full((k,), low)
    s = torch.sort(torch.rand(k, generator=gen) + 0.05, descending=True).values / math.sqrt(max(inn, 1))
    return sparse_vectors(out, k, drop, gen), s, sparse_vectors(inn, k, drop, gen)


def dense_factors(out: int, inn: int, k: int, gen: torch.Generator) -> Factors:
    """u, s, v fully dense (a LowRank delta): exercises the dense-storage fallback."""
    return torch.randn(out, k, generator=gen), torch.rand(k, generator=gen), torch.randn(inn, k, generator=gen)


@dataclass(frozen=True)
class Mix:
    name: str
    row_slots: Tensor
    """[N] int64, -1 = no task."""
    num_slots: int


def _zipf(n: int, slots: int, gen: torch.Generator) -> Tensor:
    weights = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64)
    return torch.multinomial(weights, n, replacement=True, generator=gen)


def make_mix(name: str, n: int, slots: int, gen: torch.Generator) -> Mix:
    """Task mixes: one, distinct, skewed (90% one task), zipf, none (rows without task), shuffled."""
    if name == "one":
        rs = torch.zeros(n, dtype=torch.int64)
    elif name == "distinct":
        rs = torch.arange(n, dtype=torch.int64) % slots
    elif name == "skewed":
        rs = torch.where(torch.rand(n, generator=gen) < 0.9, 0, torch.randint(0, slots, (n,), generator=gen))
    elif name == "zipf":
        rs = torch.sort(_zipf(n, slots, gen)).values
    elif name == "none":
        rs = torch.randint(-1, slots, (n,), generator=gen)
    elif name == "shuffled":
        rs = torch.randint(0, slots, (n,), generator=gen)
    else:
        raise ValueError(name)
    return Mix(name, rs.to(torch.int64), slots)


MIX_NAMES = ("one", "distinct", "skewed", "zipf", "none", "shuffled")
