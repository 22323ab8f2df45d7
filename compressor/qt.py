"""ImPart-Qt and DARE-Qt: the sparsified values quantised, the sparsity found by binary search so
the module's stored bits meet CR_qt against the dense 16-bit delta (out * in * 16 / CR_qt bits).

Counted bits: every kept value at its width, each group's float16 (min, scale), and the float32
singular values. Quantisation is round-to-nearest (quantize.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from compressor.budget import DropPlan, plan_drops, pre_prune
from compressor.codec import ModuleCode
from compressor.gptq import gptq_rows, inverse_hessian_factor
from compressor.masks import keep_mask, scatter_columns
from compressor.methods import Factors, MethodParams, encode_dare, sparse_svd_code
from compressor.quantize import BIT_RULE, GROUP, PARAM_BITS, bits_for, n_groups, pack, quantize
from compressor.svd import top_svd

SEARCH_STEPS = 24


def plan_bits(plan: DropPlan, shape: tuple[int, int]) -> int:
    """Bits an ImPart-Qt module with these drop counts stores."""
    total = 0
    for k, (du, dv) in enumerate(zip(plan.u_drops, plan.v_drops)):
        nu, nv = shape[0] - du, shape[1] - dv
        total += (nu + nv) * bits_for(k) + (n_groups(nu) + n_groups(nv)) * PARAM_BITS + 32
    return total


def search_ratio(bits_at: Callable[[float], int], target_bits: float, lo: float, hi: float) -> float:
    """The smallest parameter ratio in [lo, hi] whose bits fit target_bits (bits fall as the ratio rises)."""
    if bits_at(lo) <= target_bits:
        return lo
    for _ in range(SEARCH_STEPS):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if bits_at(mid) <= target_bits else (mid, hi)
    return hi


def encode_impart_qt(
    name: str, delta: torch.Tensor, params: MethodParams, inputs: torch.Tensor | None = None
) -> ModuleCode:
    """ImPart at the sparsity whose mixed-precision codes meet CR_qt = params.ratio; with the layer's
    calibration inputs [T, in], V is quantised by GPTQ instead of round-to-nearest."""
    shape = (int(delta.shape[0]), int(delta.shape[1]))
    k = qt_svd_rank(shape, params)
    return impart_qt_code(name, shape, top_svd(delta, k, params.svd, params.device, params.seed), params, inputs)


def qt_svd_rank(shape: tuple[int, int], params: MethodParams) -> int:
    """Singular vectors ImPart-Qt may need: the pre-prune K at the lowest parameter ratio searched."""
    return pre_prune(shape, _ratio_range(params)[0], params.beta)[0]


def _ratio_range(params: MethodParams) -> tuple[float, float]:
    """Parameter ratios that can meet CR_qt: values cost between 2 and ~8.3 bits against 16."""
    return max(1.05, params.ratio / 8), params.ratio * 4


def impart_qt_code(
    name: str, shape: tuple[int, int], svd: Factors, params: MethodParams, inputs: torch.Tensor | None = None
) -> ModuleCode:
    """ImPart-Qt from the top singular triplets."""
    u, s, v = svd
    target = shape[0] * shape[1] * 16 / params.ratio
    lo, hi = _ratio_range(params)
    ratio = search_ratio(lambda r: plan_bits(plan_drops(s, shape, r, params.beta, params.c), shape), target, lo, hi)
    plan = plan_drops(s, shape, ratio, params.beta, params.c)
    m = len(plan.u_drops)
    code = sparse_svd_code(name, shape, (u[:, :m], s[:m], v[:, :m]), plan.u_drops, plan.v_drops, params.seed)
    return quantize_svd_code(code, ratio, inputs)


def quantize_svd_code(code: ModuleCode, param_ratio: float, inputs: torch.Tensor | None = None) -> ModuleCode:
    """An "svd" code with its U and V values quantised per column by the bit rule -> "qsvd"
    (V by GPTQ when the layer's calibration inputs [T, in] are given)."""
    tensors = dict(code.tensors)
    groups, total_bits = [], 0
    for side in ("u", "v"):
        if side == "v" and inputs is not None and code.rank:
            codes, params = _gptq_v(code, inputs)
        else:
            codes, params = _rtn(code, side)
        tensors[side] = pack([(c, bits_for(k)) for k, c in enumerate(codes)])
        groups += params
        total_bits += sum(c.size * bits_for(k) for k, c in enumerate(codes))
    tensors["groups"] = torch.cat(groups) if groups else torch.zeros(0, 2, dtype=torch.float16)
    meta = {
        **code.meta,
        "bit_rule": [list(r) for r in BIT_RULE],
        "group": GROUP,
        "code_bits": total_bits,
        "param_ratio": param_ratio,
        "quantiser": "gptq-v" if inputs is not None else "rtn",
    }
    return replace(code, layout="qsvd", tensors=tensors, meta=meta)


def _rtn(code: ModuleCode, side: str) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Round-to-nearest codes and group params of each column of U or V."""
    rows = code.shape[0] if side == "u" else code.shape[1]
    counts = [rows - d for d in code.tensors[f"{side}_drops"].long().tolist()]
    pairs = [quantize(col, bits_for(k)) for k, col in enumerate(torch.split(code.tensors[side].float(), counts))]
    return [c for c, _ in pairs], [p for _, p in pairs]


def _gptq_v(code: ModuleCode, inputs: torch.Tensor) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """GPTQ codes of V^T [K, in] against the layer's input Hessian."""
    keep = keep_mask(code.mask_key("v_key"), code.shape[1], code.tensors["v_drops"].long().tolist())
    v = scatter_columns(code.tensors["v"], keep)  # [in, K]
    hinv = inverse_hessian_factor(inputs.to(torch.float32))
    return gptq_rows(v.t(), keep.t(), hinv, [bits_for(k) for k in range(code.rank)])


def encode_dare_qt(name: str, delta: torch.Tensor, params: MethodParams) -> ModuleCode:
    """DARE keeping as many values as fit CR_qt at params.bits each (plus group parameters)."""
    numel = int(delta.shape[0]) * int(delta.shape[1])
    per_value = params.bits + PARAM_BITS / GROUP
    kept = max(int(delta.shape[0]), int(numel * 16 / params.ratio / per_value))
    code = encode_dare(name, delta, replace(params, ratio=numel / kept))
    codes, groups = quantize(code.tensors["d"].float(), params.bits)
    meta = {
        **code.meta,
        "bits": params.bits,
        "group": GROUP,
        "code_bits": int(codes.size * params.bits),
        "param_ratio": numel / kept,
    }
    return replace(code, layout="qsparse", tensors={"d": pack([(codes, params.bits)]), "groups": groups}, meta=meta)
