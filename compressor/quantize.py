"""Round-to-nearest asymmetric quantisation of kept values, in groups, with bit-exact packing.

Each group of `group` consecutive values (never crossing a column) has a float16 (min, scale);
code = round((x - min) / scale) in [0, 2^bits - 1]. Codes of all columns are packed back to back,
least significant bit first, so a b-bit value costs exactly b bits. ImPart-Qt picks the width by
singular-vector index: vectors 1-2 at 8 bits, 3-34 at 3 bits, the rest at 2 bits (the paper's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

GROUP = 128
BIT_RULE: tuple[tuple[int | None, int], ...] = ((2, 8), (34, 3), (None, 2))
"""(vectors below this index, bits): first 2 vectors 8 bits, up to 34 3 bits, the rest 2 bits."""
PARAM_BITS = 32
"""A group's min and scale, two float16."""


BitRule = Sequence[Sequence[int | None]]
"""[(below, bits), ..., (None, bits)]: BIT_RULE, or an artifact's `bit_rule` as JSON lists."""


def bits_for(index: int, rule: BitRule = BIT_RULE) -> int:
    """The bit width of singular vector `index` under `rule`."""
    for below, bits in rule:
        if bits is None:
            raise ValueError(f"bit rule {rule!r} has an entry without a bit width")
        if below is None or index < below:
            return int(bits)
    raise ValueError(f"bit rule {rule!r} has no catch-all entry")


def n_groups(n: int, group: int = GROUP) -> int:
    """Quantisation groups of `group` values that `n` values need (the last one may be short)."""
    return (n + group - 1) // group


def quantize(x: torch.Tensor, bits: int, group: int = GROUP) -> tuple[np.ndarray, torch.Tensor]:
    """x [n] float -> (codes [n] uint8, params [groups, 2] float16 (min, scale))."""
    n = x.numel()
    if n == 0:
        return np.zeros(0, np.uint8), torch.zeros(0, 2, dtype=torch.float16)
    pad = n_groups(n, group) * group - n
    xs = torch.cat([x.float(), x.float()[-1:].expand(pad)]).reshape(-1, group)
    lo, hi = xs.min(dim=1).values, xs.max(dim=1).values
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16)
    lo16 = lo.to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((xs - lo16.float()[:, None]) / scale.float()[:, None]).clamp(0, 2**bits - 1)
    return codes.reshape(-1)[:n].to(torch.uint8).numpy(), torch.stack([lo16, scale], dim=1)


def dequantize(codes: np.ndarray, params: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Inverse of quantize up to rounding: codes [n], params [groups, 2] -> float32 [n]."""
    n = codes.shape[0]
    lo = params[:, 0].float().repeat_interleave(group)[:n]
    scale = params[:, 1].float().repeat_interleave(group)[:n]
    return torch.from_numpy(codes.astype(np.float32)) * scale + lo


def pack(streams: Sequence[tuple[np.ndarray, int]]) -> torch.Tensor:
    """Concatenate (codes, bits) streams bit-exactly -> uint8 [ceil(total bits / 8)]."""
    planes = [((c[:, None] >> np.arange(b, dtype=np.uint8)) & 1).reshape(-1) for c, b in streams if c.size]
    bits = np.concatenate(planes).astype(np.uint8) if planes else np.zeros(0, np.uint8)
    return torch.from_numpy(np.packbits(bits, bitorder="little"))


def unpack(packed: torch.Tensor, shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """Inverse of pack: (count, bits) per stream -> the streams' codes."""
    bits = np.unpackbits(packed.numpy(), bitorder="little")
    out, pos = [], 0
    for count, width in shapes:
        chunk = bits[pos : pos + count * width].reshape(count, width).astype(np.uint16)
        out.append((chunk << np.arange(width, dtype=np.uint16)).sum(axis=1).astype(np.uint8))
        pos += count * width
    return out
