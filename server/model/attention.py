"""Attention over a paged KV cache for a flat batch of rows (decodes and prefill chunks mixed).

Rows are tokens of several sequences laid end to end. Each row's K/V goes to its cache slot first;
then decode rows (one token per sequence) attend together in one batched SDPA call over their
gathered blocks, and each prefill chunk attends alone (causal within the chunk, full over its past).
With a sliding window (Mistral, some Qwen2 layers) a query at position p sees keys p - window + 1 .. p,
as transformers masks them; the cache keeps every token (masked, not evicted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillChunk:
    """A chunk of several rows of one sequence, attending causally over its past."""

    start_row: int
    num_rows: int
    context_len: int
    """Tokens in the cache for this sequence once the chunk is written (past + chunk)."""
    token_slots: torch.Tensor  # [context_len] int64 flat cache slots of the sequence's tokens

    @property
    def past_len(self) -> int:
        """Tokens of the sequence in the cache before the chunk."""
        return self.context_len - self.num_rows


@dataclass(frozen=True)
class DecodeGroup:
    """The single-token rows of a step, attending together in one batched call."""

    rows: torch.Tensor  # [B] int64 row of each single-token sequence
    token_slots: torch.Tensor  # [B, L] int64 flat cache slots, padded (padding masked out)
    mask: torch.Tensor  # [B, 1, 1, L] bool, True where the key is part of the sequence


@dataclass(frozen=True)
class AttentionMeta:
    """One step's attention layout, shared by every layer."""

    slot_mapping: torch.Tensor  # [T] int64 flat cache slot each row's K/V is written to
    decode: DecodeGroup | None
    prefills: tuple[PrefillChunk, ...]


@dataclass(frozen=True)
class LayerCache:
    """One layer's view of the KV cache."""

    key: torch.Tensor  # [num_slots, kv_heads, head_dim] one layer's keys, all blocks flattened
    value: torch.Tensor  # [num_slots, kv_heads, head_dim]


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache,
    meta: AttentionMeta,
    window: int | None = None,
) -> torch.Tensor:
    """q: [T, heads, D], k/v: [T, kv_heads, D] (already rotated) -> out: [T, heads, D]."""
    cache.key[meta.slot_mapping] = k
    cache.value[meta.slot_mapping] = v
    out = torch.empty_like(q)
    if meta.decode is not None:
        out[meta.decode.rows] = _decode_attention(q[meta.decode.rows], cache, meta.decode, window)
    for chunk in meta.prefills:
        rows = slice(chunk.start_row, chunk.start_row + chunk.num_rows)
        out[rows] = _prefill_attention(q[rows], k[rows], v[rows], cache, chunk, window)
    return out


def _decode_attention(q: torch.Tensor, cache: LayerCache, group: DecodeGroup, window: int | None) -> torch.Tensor:
    """q: [B, heads, D] -> [B, heads, D], each row attending to its own gathered context."""
    keys = cache.key[group.token_slots].transpose(1, 2)  # [B, kv_heads, L, D]
    values = cache.value[group.token_slots].transpose(1, 2)
    mask = group.mask
    if window is not None:
        # key l of a row is at position l; the row's query sits at its last valid key
        last = group.mask.sum(-1, keepdim=True) - 1  # [B, 1, 1, 1]
        mask = mask & (torch.arange(mask.shape[-1], device=mask.device) > last - window)
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0, :]


def _prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache, chunk: PrefillChunk, window: int | None
) -> torch.Tensor:
    """q: [n, heads, D], k/v: [n, kv_heads, D] of one chunk -> [n, heads, D]."""
    if chunk.past_len == 0 and (window is None or window >= chunk.num_rows):
        keys, values, mask, causal = k, v, None, True
    else:
        if chunk.past_len == 0:
            keys, values = k, v
        else:
            keys, values = cache.key[chunk.token_slots], cache.value[chunk.token_slots]
        query_pos = torch.arange(chunk.past_len, chunk.context_len, device=q.device)[:, None]
        key_pos = torch.arange(chunk.context_len, device=q.device)[None, :]
        mask = key_pos <= query_pos
        if window is not None:
            mask = mask & (key_pos > query_pos - window)
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        keys.transpose(0, 1),
        values.transpose(0, 1),
        attn_mask=mask,
        is_causal=causal,
        enable_gqa=True,
    )
    return out.transpose(0, 1)
