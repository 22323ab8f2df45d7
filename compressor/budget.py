"""How many values each matrix keeps, and ImPart's per-vector drop counts that meet it exactly.

The compression ratio CR counts parameters: dense delta entries / values kept in U and V. So a
[out, in] matrix keeps round(out * in / CR) values whatever its shape; the paper's alpha_attn and
alpha_mlp are this rule evaluated on LLaMA's shapes (alpha = 1 - out*in / (CR * (out+in) * r)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

BISECT_STEPS = 40
"""Bisection steps for the common scale t of the ratios (2^-40 of its range: below one kept value)."""


@dataclass(frozen=True)
class DropPlan:
    """Exact drop counts of the kept singular vectors (p_k = drops / rows, p_1 = 0)."""

    u_drops: tuple[int, ...]
    v_drops: tuple[int, ...]
    kept: int
    """Values kept in U and V together."""
    pre_pruned: int
    """K = floor(r (1 - beta)): vectors considered before the boundary shift."""


def kept_budget(shape: tuple[int, int], ratio: float) -> int:
    """Values a [out, in] matrix may keep at compression ratio `ratio`."""
    return round(shape[0] * shape[1] / ratio)


def drop_alpha(shape: tuple[int, int], ratio: float) -> float:
    """The share of all U and V entries (full-rank SVD) to drop, from the matrix's own shape."""
    out, inp = shape
    return 1.0 - kept_budget(shape, ratio) / ((out + inp) * min(out, inp))


def drop_ratios(s: torch.Tensor, gamma: float, c: float) -> torch.Tensor:
    """p_k = gamma (1 - s_k^C / s_1^C) for s [K] (descending): p_1 = 0, larger for weaker vectors."""
    if s.numel() == 0 or float(s[0]) <= 0.0:
        return torch.zeros_like(s, dtype=torch.float64)
    importance = s.double().clamp_min(0.0).pow(c)
    return gamma * (1.0 - importance / importance[0])


def pre_prune(shape: tuple[int, int], ratio: float, beta: float) -> tuple[int, float]:
    """(K, gamma): vectors kept by the pre-prune and their mean drop ratio. When the budget allows
    more than r (1 - beta) dense vectors (low CR), beta is lowered to just under alpha."""
    r = min(shape)
    alpha = max(drop_alpha(shape, ratio), 0.0)
    k = math.floor(r * (1.0 - beta) + 1e-9)
    if alpha < beta:
        k = min(r, math.ceil(r * (1.0 - alpha) - 1e-9))
    beta_eff = 1.0 - k / r
    return k, max(0.0, (alpha - beta_eff) / (1.0 - beta_eff)) if k else 0.0


def plan_drops(s: torch.Tensor, shape: tuple[int, int], ratio: float, beta: float, c: float) -> DropPlan:
    """ImPart's drop counts for singular values s (descending, at least K of them), meeting the budget."""
    out, inp = shape
    budget = kept_budget(shape, ratio)
    k, gamma = pre_prune(shape, ratio, beta)
    p = drop_ratios(s[:k], gamma, c)
    m = _boundary(p, shape, budget)
    u_drops, v_drops = _meet_budget(p, m, shape, budget)
    kept = sum(out - d for d in u_drops) + sum(inp - d for d in v_drops)
    return DropPlan(tuple(u_drops), tuple(v_drops), kept, k)


def _drops(p: torch.Tensor, rows: int) -> torch.Tensor:
    """Entries dropped per column at ratios p [K]: floor(rows p), at least one entry kept."""
    return torch.clamp(torch.floor(rows * p.clamp(0.0, 1.0)), max=rows - 1).long()


def _kept(p: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Values kept by each vector at drop ratios p: [K] int64."""
    out, inp = shape
    return (out - _drops(p, out)) + (inp - _drops(p, inp))


def _boundary(p: torch.Tensor, shape: tuple[int, int], budget: int) -> int:
    """The paper's boundary shift: drop whole tail vectors (p = 1) until the rest fit the budget."""
    cumulative = torch.cumsum(_kept(p, shape), 0)
    return int((cumulative <= budget).sum())


def _meet_budget(p: torch.Tensor, m: int, shape: tuple[int, int], budget: int) -> tuple[list[int], list[int]]:
    """Close the boundary shift's gap by scaling every ratio by one factor t (p_1 stays 0), never with
    one fractional vector: lower them (t <= 1) over the m vectors when dense ones can reach the budget,
    else raise them (t > 1) over m + 1 vectors. The last few values go to the most-dropped columns."""
    out, inp = shape
    grow = m < p.numel() and m * (out + inp) < budget and int(_kept(p[: m + 1] * 1e9, shape).sum()) <= budget
    q = p[: m + 1] if grow else p[:m]
    lo, hi = (1.0, 1e9) if grow else (0.0, 1.0)
    if not grow and int(_kept(q * lo, shape).sum()) <= budget:
        hi = lo
    for _ in range(BISECT_STEPS):
        mid = (lo * hi) ** 0.5 if grow else (lo + hi) / 2
        lo, hi = (lo, mid) if int(_kept(q * mid, shape).sum()) <= budget else (mid, hi)
    u, v = _drops(q * hi, out).tolist(), _drops(q * hi, inp).tolist()
    _spend_remainder(u, v, budget - int(_kept(q * hi, shape).sum()))
    return u, v


def _spend_remainder(u: list[int], v: list[int], remainder: int) -> None:
    """Keep `remainder` more values: one fewer drop in each of the most-dropped columns, in turn."""
    columns = sorted([(d, 0, k) for k, d in enumerate(u)] + [(d, 1, k) for k, d in enumerate(v)], reverse=True)
    columns = [c for c in columns if c[0] > 0]
    for i in range(min(remainder, sum(c[0] for c in columns))):
        _, side, k = columns[i % len(columns)]
        target = u if side == 0 else v
        if target[k] > 0:
            target[k] -= 1
