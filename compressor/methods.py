"""The compression methods, each turning one 2-D delta into a ModuleCode.

- impart: SVD, pre-prune to K vectors, importance-based drop ratios (budget.py), exact random drops
  in U and V columns independently, survivors rescaled by 1/(1 - p_k); s dense.
- lowrank: the top round(out*in / (CR (out+in))) singular vectors, dense.
- dare: drop entries of the delta at random (exact count per row), rescale by 1/(1 - p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.budget import kept_budget, plan_drops, pre_prune
from compressor.codec import VALUE_DTYPE, ModuleCode, drops_tensor
from compressor.masks import gather_columns, keep_mask, mask_key
from compressor.svd import SvdMode, top_svd

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(u [out, K], s [K], v [in, K])."""


@dataclass(frozen=True)
class MethodParams:
    """Hyper-parameters shared by the methods (each uses the ones it needs)."""

    ratio: float = 32.0
    seed: int = 0
    beta: float = 0.8
    c: float = 0.5
    svd: SvdMode = "auto"
    device: str = "cpu"
    bits: int = 4
    """Bit width of DARE-Qt's kept values (ImPart-Qt uses its per-vector rule instead)."""
    embedding_method: str | None = None
    """Method for the embedding / LM head (other 2-D tensors): None = the main method; "full" = 16-bit."""
    embedding_ratio: float | None = None
    """Ratio for the embedding / LM head: None = the main ratio."""
    gptq_prompts: int = 0
    """ImPart-Qt: quantise V by GPTQ on this many built-in calibration prompts (0 = round-to-nearest)."""


def encode_dense(name: str, delta: torch.Tensor) -> ModuleCode:
    """A 1-D delta (norm weights, biases) stored whole in float32."""
    return ModuleCode(name, tuple(delta.shape), "dense", {"delta": delta.to(torch.float32).contiguous()})


def encode_full(name: str, delta: torch.Tensor, params: MethodParams) -> ModuleCode:
    """The whole 2-D delta in 16 bits (merged deltas; the uncompressed comparison)."""
    return ModuleCode(name, tuple(delta.shape), "full", {"d": delta.to(VALUE_DTYPE).contiguous()})


def encode_impart(name: str, delta: torch.Tensor, params: MethodParams) -> ModuleCode:
    """ImPart on delta [out, in]."""
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    k, _ = pre_prune(shape, params.ratio, params.beta)
    return impart_code(name, shape, top_svd(delta, k, params.svd, params.device, params.seed), params)


def impart_code(name: str, shape: tuple[int, int], svd: Factors, params: MethodParams) -> ModuleCode:
    """ImPart from the top singular triplets (at least K of them; extra ones are ignored)."""
    u, s, v = svd
    plan = plan_drops(s, shape, params.ratio, params.beta, params.c)
    m = len(plan.u_drops)
    return sparse_svd_code(name, shape, (u[:, :m], s[:m], v[:, :m]), plan.u_drops, plan.v_drops, params.seed)


def encode_lowrank(name: str, delta: torch.Tensor, params: MethodParams) -> ModuleCode:
    """Truncated SVD with as many dense vectors as the budget holds."""
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    k = lowrank_rank(shape, params.ratio)
    return lowrank_code(name, shape, top_svd(delta, k, params.svd, params.device, params.seed), params)


def lowrank_rank(shape: tuple[int, int], ratio: float) -> int:
    """Singular triplets LowRank keeps for a [out, in] matrix at `ratio` (dense u and v columns)."""
    return min(*shape, kept_budget(shape, ratio) // (shape[0] + shape[1]))


def lowrank_code(name: str, shape: tuple[int, int], svd: Factors, params: MethodParams) -> ModuleCode:
    """The top singular triplets that fit the budget, dense."""
    k = lowrank_rank(shape, params.ratio)
    u, s, v = (t[..., :k] for t in svd)
    return sparse_svd_code(name, shape, (u, s, v), [0] * k, [0] * k, params.seed)


def sparse_svd_code(
    name: str,
    shape: tuple[int, int],
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    u_drops: list[int] | tuple[int, ...],
    v_drops: list[int] | tuple[int, ...],
    seed: int,
) -> ModuleCode:
    """Drop u_drops[k] entries of u[:, k] and v_drops[k] of v[:, k] at random; keep the rescaled rest."""
    u, s, v = factors  # u [out, K], s [K], v [in, K]
    keys = {side: mask_key(seed, name, side) for side in ("u", "v")}
    u_vals = _kept_rescaled(u, keep_mask(keys["u"], shape[0], u_drops), u_drops)
    v_vals = _kept_rescaled(v, keep_mask(keys["v"], shape[1], v_drops), v_drops)
    tensors = {
        "s": s.to(torch.float32).contiguous(),
        "u": u_vals.to(VALUE_DTYPE).contiguous(),
        "v": v_vals.to(VALUE_DTYPE).contiguous(),
        "u_drops": drops_tensor(u_drops, shape[0]),
        "v_drops": drops_tensor(v_drops, shape[1]),
    }
    return ModuleCode(name, shape, "svd", tensors, {"u_key": f"{keys['u']:016x}", "v_key": f"{keys['v']:016x}"})


def _kept_rescaled(x: torch.Tensor, keep: torch.Tensor, drops: list[int] | tuple[int, ...]) -> torch.Tensor:
    """Survivors of x [rows, K] under keep, each column scaled by rows / (rows - drops): [nnz] float32.

    A column that drops every entry (DARE at a ratio above the row length) keeps nothing: scale 0."""
    rows = x.shape[0]
    scales = [rows / (rows - d) if d < rows else 0.0 for d in drops]
    scale = torch.tensor(scales, dtype=torch.float32) if len(drops) else torch.ones(0)
    return gather_columns(x.to(torch.float32) * scale, keep)


def encode_dare(name: str, delta: torch.Tensor, params: MethodParams) -> ModuleCode:
    """DARE: keep round(out*in / CR) entries at random (equal counts per row), rescaled per row."""
    out, inp = int(delta.shape[0]), int(delta.shape[1])
    total_drop = out * inp - kept_budget((out, inp), params.ratio)
    base, extra = divmod(total_drop, out)
    drops = [base + 1] * extra + [base] * (out - extra)
    key = mask_key(params.seed, name, "d")
    values = _kept_rescaled(delta.t(), keep_mask(key, inp, drops), drops)
    meta = {"key": f"{key:016x}", "drop_base": base, "drop_extra": extra}
    return ModuleCode(name, (out, inp), "sparse", {"d": values.to(VALUE_DTYPE).contiguous()}, meta)
