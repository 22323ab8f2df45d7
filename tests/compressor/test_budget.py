"""ImPart's budget: every shape meets CR exactly, p_1 = 0, the boundary shift, no fractional vector."""

from __future__ import annotations

import pytest
import torch

from compressor.budget import drop_alpha, drop_ratios, kept_budget, plan_drops, pre_prune

SHAPES = {
    "square": (576, 576),
    "gqa_kv": (192, 576),
    "mlp_up": (1536, 576),
    "mlp_down": (576, 1536),
    "tiny_kv": (32, 64),
    "embedding": (4096, 64),
}


def spectrum(r: int, kind: str) -> torch.Tensor:
    if kind == "flat":
        return torch.linspace(1.0, 0.3, r)
    return torch.logspace(0, -3, r)


@pytest.mark.parametrize("ratio", [8.0, 16.0, 32.0, 64.0])
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("kind", ["flat", "steep"])
def test_impart_meets_the_ratio_within_a_tenth_of_a_percent(name: str, ratio: float, kind: str) -> None:
    shape = SHAPES[name]
    budget = kept_budget(shape, ratio)
    if budget < shape[0] + shape[1]:
        pytest.skip("budget below one dense vector: nothing can be kept with p_1 = 0")
    plan = plan_drops(spectrum(min(shape), kind), shape, ratio, beta=0.8, c=0.5)
    assert abs(plan.kept - shape[0] * shape[1] / ratio) <= 0.001 * shape[0] * shape[1] / ratio


def test_alpha_matches_the_paper_on_llama_shapes() -> None:
    rho = 1 - 1 / 32
    assert drop_alpha((4096, 4096), 32) == pytest.approx((1 + rho) / 2, abs=1e-6)
    assert drop_alpha((11008, 4096), 32) == pytest.approx((0.55 + 1.45 * rho) / 2, abs=2e-3)


def test_first_vector_is_never_dropped_and_ratios_fall_with_importance() -> None:
    s = torch.logspace(0, -2, 100)
    p = drop_ratios(s, gamma=0.9, c=0.5)
    assert p[0] == 0.0
    assert bool((p[1:] >= p[:-1]).all())
    plan = plan_drops(s, (400, 100), 16.0, beta=0.8, c=0.5)
    assert plan.u_drops[0] == 0 and plan.v_drops[0] == 0
    assert all(b >= a - 1 for a, b in zip(plan.u_drops, plan.u_drops[1:])), plan.u_drops


def test_boundary_shift_keeps_fewer_vectors_than_the_pre_prune() -> None:
    shape, s = (1536, 576), torch.logspace(0, -3, 576)
    k, gamma = pre_prune(shape, 32.0, 0.8)
    plan = plan_drops(s, shape, 32.0, beta=0.8, c=0.5)
    assert k == int(576 * 0.2) and 0 < gamma < 1
    assert 0 < len(plan.u_drops) < k


def test_no_single_vector_carries_a_fractional_ratio_near_one() -> None:
    """The gap after the boundary shift is spread over all vectors, not put on the last one."""
    shape = (1536, 576)
    for ratio in (8.0, 16.0, 32.0, 64.0):
        plan = plan_drops(torch.logspace(0, -3, 576), shape, ratio, beta=0.8, c=0.5)
        last = plan.u_drops[-1] / shape[0]
        before = plan.u_drops[-2] / shape[0] if len(plan.u_drops) > 1 else 0.0
        assert last - before < 0.2, (ratio, plan.u_drops[-3:])


def test_low_ratio_lowers_beta_instead_of_negative_ratios() -> None:
    plan = plan_drops(torch.logspace(0, -3, 64), (64, 64), 2.0, beta=0.8, c=0.5)
    assert min(plan.u_drops) >= 0 and plan.kept == kept_budget((64, 64), 2.0)
