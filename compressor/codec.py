"""One module's compressed delta as stored: its layout, its tensors and its JSON metadata.

Layouts:
- "svd": s [K] float32, the kept values of U and V (float16, column by column), their drop counts
  per column; the drop masks are regenerated from two 64-bit keys (masks.py), so they cost no bytes.
- "sparse": DARE's kept delta values (float16, row by row), drop counts given as (base, extra):
  rows [0, extra) drop base + 1 entries, the rest drop base; mask regenerated from a key.
- "dense": the delta itself (float32), for 1-D tensors (norm weights, biases).
- "full": a 2-D delta stored whole (float16, tensor "d"), e.g. a merged delta; factors (D, 1, I).
- "qsvd" / "qsparse": "svd" / "sparse" with the kept values quantised (quantize.py): tensors "u", "v"
  (or "d") hold packed codes, "groups" the float16 (min, scale) of every group of 128.
- "lora": dense factors stored exactly (a LoRA adapter's module): u [out, r] = B, s [r] = its scaling,
  v [in, r] = A^T; u and v in float32 or the adapter's 16-bit dtype, s float32.
Values are stored already rescaled by 1/(1 - p), so decoding is a scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from compressor.masks import keep_mask, scatter_columns
from compressor.quantize import BIT_RULE, BitRule, bits_for, dequantize, n_groups, unpack

VALUE_DTYPE = torch.float16


def json_int(value: object, what: str) -> int:
    """int() of a number or numeric string read from an artifact's JSON; TypeError naming `what` otherwise."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be a number, not {value!r:.40}")
    return int(value)


def json_float(value: object, what: str) -> float:
    """float() of a number or numeric string read from an artifact's JSON; TypeError naming `what` otherwise."""
    if not isinstance(value, (int, float, str)):
        raise TypeError(f"{what} must be a number, not {value!r:.40}")
    return float(value)


@dataclass(frozen=True)
class ModuleCode:
    """One module's stored form in an artifact: its layout, its tensors and the layout's metadata."""

    name: str
    shape: tuple[int, ...]
    layout: str
    """"svd" | "qsvd" | "sparse" | "qsparse" | "full" | "dense" | "lora"."""
    tensors: dict[str, torch.Tensor]
    """Stored tensors by role: svd {s, u, v, u_drops, v_drops}; sparse {d}; dense {delta}."""
    meta: dict[str, object] = field(default_factory=dict)
    """JSON-able layout data: mask keys (hex), sparse drop counts, quantisation groups."""

    @property
    def kept(self) -> int:
        """Values kept (the CR denominator): U and V entries, DARE entries, or dense entries."""
        if self.layout in ("svd", "qsvd"):
            drops = self.tensors["u_drops"].long().sum() + self.tensors["v_drops"].long().sum()
            return int(self.rank * (self.shape[0] + self.shape[1]) - drops)
        if self.layout in ("sparse", "qsparse"):
            return int(self.shape[0] * self.shape[1] - sum(sparse_drops(self)))
        if self.layout == "lora":
            return self.rank * (self.shape[0] + self.shape[1])
        return int(torch.Size(self.shape).numel())

    @property
    def rank(self) -> int:
        return int(self.tensors["s"].numel()) if self.layout in ("svd", "qsvd", "lora") else 0

    def meta_int(self, field: str) -> int:
        """An integer of meta (drop counts, bits, code_bits); compressor.validate checks the ones decoding needs."""
        return json_int(self.meta[field], f"{self.name}: {field}")

    def mask_key(self, field: str) -> int:
        """A 64-bit mask key of meta ("key", "u_key", "v_key"), stored as hex digits."""
        return int(str(self.meta[field]), 16)

    def bit_rule(self) -> BitRule:
        """The "qsvd" bit rule of meta (BIT_RULE when absent)."""
        rule = self.meta.get("bit_rule", BIT_RULE)
        if not isinstance(rule, (list, tuple)):
            raise TypeError(f"{self.name}: bit_rule must be a list, not {rule!r:.40}")
        return rule


def drops_tensor(drops: list[int] | tuple[int, ...], rows: int) -> torch.Tensor:
    """Per-column drop counts in the smallest integer type that holds them: [K]."""
    dtype = torch.uint16 if rows < 2**16 else torch.int32
    return torch.tensor(list(drops), dtype=torch.int64).to(dtype)


def decode_factors(code: ModuleCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [out, K], s [K], v [in, K]) float32 with delta = u @ diag(s) @ v.T (contract A)."""
    if code.layout in ("svd", "qsvd"):
        return _svd_factors(code)
    if code.layout == "lora":
        u, s, v = (code.tensors[role].to(torch.float32) for role in ("u", "s", "v"))
        return u, s, v
    if code.layout in ("sparse", "qsparse", "full"):
        d = decode_dense(code)
        return d, torch.ones(d.shape[1]), torch.eye(d.shape[1])
    raise ValueError(f"{code.name}: a {code.layout} delta has no factors; use dense()")


def decode_dense(code: ModuleCode) -> torch.Tensor:
    """The full reconstructed delta, float32, shaped like the base tensor (a fresh tensor)."""
    if code.layout == "dense":
        return code.tensors["delta"].to(torch.float32, copy=True).reshape(code.shape)
    if code.layout == "full":
        return code.tensors["d"].to(torch.float32).reshape(code.shape)
    if code.layout in ("sparse", "qsparse"):
        keep = keep_mask(code.mask_key("key"), code.shape[1], sparse_drops(code))  # [in, out]
        return scatter_columns(_sparse_values(code), keep).t().contiguous()
    u, s, v = decode_factors(code)
    return (u * s) @ v.t()


def sparse_drops(code: ModuleCode) -> list[int]:
    """DARE's per-row drop counts from their (base, extra) form."""
    base, extra = code.meta_int("drop_base"), code.meta_int("drop_extra")
    return [base + 1] * extra + [base] * (code.shape[0] - extra)


def _sparse_values(code: ModuleCode) -> torch.Tensor:
    if code.layout == "sparse":
        return code.tensors["d"].to(torch.float32)
    n = code.kept
    (codes,) = unpack(code.tensors["d"], [(n, code.meta_int("bits"))])
    return dequantize(codes, code.tensors["groups"])


def column_bits(code: ModuleCode) -> list[int]:
    """The bit width of each kept singular vector of a quantised code, by its index."""
    rule = code.bit_rule()
    return [bits_for(k, rule) for k in range(code.rank)]


def _svd_values(code: ModuleCode, side: str) -> torch.Tensor:
    """The kept values of U or V, column by column, float32 (dequantised for "qsvd")."""
    if code.layout == "svd":
        return code.tensors[side].to(torch.float32)
    streams = unpack(code.tensors[side], list(zip(_counts(code, side), column_bits(code))))
    groups = code.tensors["groups"]
    start = 0 if side == "u" else sum(n_groups(n) for n in _counts(code, "u"))
    parts = []
    for codes in streams:
        g = n_groups(codes.shape[0])
        parts.append(dequantize(codes, groups[start : start + g]))
        start += g
    return torch.cat(parts) if parts else torch.zeros(0)


def _counts(code: ModuleCode, side: str) -> list[int]:
    rows = code.shape[0] if side == "u" else code.shape[1]
    return [rows - d for d in code.tensors[f"{side}_drops"].long().tolist()]


def _svd_factors(code: ModuleCode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out, inp = code.shape
    u_keep = keep_mask(code.mask_key("u_key"), out, code.tensors["u_drops"].long().tolist())
    v_keep = keep_mask(code.mask_key("v_key"), inp, code.tensors["v_drops"].long().tolist())
    u = scatter_columns(_svd_values(code, "u"), u_keep)
    v = scatter_columns(_svd_values(code, "v"), v_keep)
    return u, code.tensors["s"].to(torch.float32), v
