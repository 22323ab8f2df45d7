"""The paged KV cache: fixed-size blocks from one preallocated pool, sized from a byte budget.

A sequence holds a list of block ids; any free block serves any sequence, so many concurrent
sequences of any lengths never fragment the pool (the waste is under one block per sequence).
"""

from __future__ import annotations

from collections import deque

import torch

from server.model.attention import LayerCache
from server.model.config import ModelConfig


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free (callers check `can_allocate` first)."""


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for `block_size` tokens."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.kv_size * item


class KVCache:
    def __init__(
        self, config: ModelConfig, budget_bytes: int, block_size: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.block_size = block_size
        self.num_blocks = budget_bytes // bytes_per_block(config, block_size, dtype)
        if self.num_blocks < 1:
            raise ValueError(
                f"KV cache budget {budget_bytes} B holds no block of {bytes_per_block(config, block_size, dtype)} B"
            )
        self.pad_slot = self.num_blocks * block_size
        """A slot no block holds, never written, so always zero: padding of batched decode contexts points
        here. (Masked keys still enter attention's arithmetic: a stale NaN left in a freed block by a
        failed request would turn another request's padded row to NaN.)"""
        shape = (config.num_hidden_layers, self.pad_slot + 1, config.num_key_value_heads, config.head_dim)
        self._key = torch.zeros(shape, device=device, dtype=dtype)  # [layers, slots + 1 pad, kv_heads, head_dim]
        self._value = torch.zeros(shape, device=device, dtype=dtype)
        self.layers = [LayerCache(self._key[i], self._value[i]) for i in range(config.num_hidden_layers)]
        self._free: deque[int] = deque(range(self.num_blocks))

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, held: int, tokens: int) -> int:
        """Extra blocks a sequence holding `held` blocks needs to store `tokens` tokens in all."""
        return max(0, -(-tokens // self.block_size) - held)

    def can_allocate(self, count: int) -> bool:
        return count <= len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)

    def token_slots(self, blocks: list[int], length: int) -> torch.Tensor:
        """[length] int64: the flat cache slot of each of a sequence's first `length` tokens."""
        table = torch.tensor(blocks, dtype=torch.int64)
        offsets = torch.arange(self.block_size, dtype=torch.int64)
        return (table[:, None] * self.block_size + offsets[None, :]).reshape(-1)[:length]
