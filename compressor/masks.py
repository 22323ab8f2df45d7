"""Random drop masks that a 64-bit key regenerates exactly, so the artifact stores no index positions.

Each column c of a [rows, K] mask drops exactly `drops[c]` entries: the entries whose keys
splitmix64(key + c * rows + row) are the smallest in that column (found by a partial sort). splitmix64 is fixed integer
arithmetic (written here, not a library RNG, because its stream must never change between
versions or devices: an artifact written today must decode identically forever).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

MASK_SCHEME = "splitmix64-rank-v1"
"""The name of this module's mask rule, written into every artifact's manifest (`mask_scheme`); a loader
refuses an artifact that names another rule (its masks would decode wrongly)."""
CHUNK_KEYS = 1 << 22
"""Keys generated at a time (32 MiB of uint64): bounds the memory of a large mask."""
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def mask_key(seed: int, name: str, side: str) -> int:
    """The 64-bit key of one factor's mask, from the artifact seed, the tensor name and 'u' / 'v'."""
    digest = hashlib.sha256(f"{seed}:{name}:{side}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z ^= z >> np.uint64(30)
        z *= _MIX1
        z ^= z >> np.uint64(27)
        z *= _MIX2
        z ^= z >> np.uint64(31)
        return z


def keep_mask(key: int, rows: int, drops: Sequence[int]) -> torch.Tensor:
    """Bool keep-mask [rows, K]; column c keeps rows - drops[c] entries, chosen by `key`."""
    k = len(drops)
    keep = np.ones((k, rows), dtype=bool)
    drops_arr = np.asarray(drops, dtype=np.int64)
    step = max(1, CHUNK_KEYS // max(rows, 1))
    for c0 in range(0, k if rows else 0, step):
        c1 = min(k, c0 + step)
        keep[c0:c1] = _keep_block(key, rows, c0, drops_arr[c0:c1])
    return torch.from_numpy(np.ascontiguousarray(keep.T))


def _keep_block(key: int, rows: int, c0: int, drops: np.ndarray) -> np.ndarray:
    """Keep-mask rows of columns c0 .. c0 + len(drops) - 1: [n, rows] bool."""
    with np.errstate(over="ignore"):
        keys = np.arange(c0 * rows, (c0 + len(drops)) * rows, dtype=np.uint64).reshape(len(drops), rows)
        keys += np.uint64(key)
    keys = _splitmix64(keys)
    keep = np.ones(keys.shape, dtype=bool)
    for d in np.unique(drops[drops > 0]):
        cols = np.flatnonzero(drops == d)
        block = keys if cols.size == len(drops) else keys[cols]
        threshold = np.partition(block, int(d) - 1, axis=1)[:, int(d) - 1]
        keep[cols] = block > threshold[:, None]
    return keep


def gather_columns(matrix: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept entries of `matrix` [rows, K], column by column, each column top to bottom -> [nnz]."""
    return matrix.t()[keep.t()]


def scatter_columns(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_columns: a float32 [rows, K] with `values` at the kept places, zeros elsewhere."""
    out_t = torch.zeros(keep.shape[1], keep.shape[0], dtype=torch.float32)
    out_t[keep.t()] = values.to(torch.float32)
    return out_t.t().contiguous()


def bitmask_bytes(rows: int, k: int) -> int:
    """What a stored bitmask of a [rows, K] factor would cost, for comparison with a regenerated one."""
    return (rows * k + 7) // 8
