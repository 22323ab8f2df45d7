"""The paged KV cache: fixed-size blocks from one preallocated pool, sized from a byte budget, with
automatic prefix caching.

A sequence holds a list of block ids; any free block serves any sequence, so many concurrent
sequences of any lengths never fragment the pool (the waste is under one block per sequence).

Prefix caching: a full block whose K/V is known good can be *published* under the hash of its chain
(`prefix_root` of the task version, then `block_hash` per block over the parent hash and the block's
tokens). A later sequence whose leading blocks hash the same claims them instead of recomputing them.
Blocks are reference counted: a block held by any sequence is never handed out again; a published
block that nobody holds waits in an LRU and is reused (its hash forgotten) only when the free list is
empty.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable

import torch

from server.model.attention import LayerCache
from server.model.config import ModelConfig

BASE_KEY = b"base"
"""The chain key of base-only sequences (a task's key holds its name and its artifact's sha256)."""


class OutOfBlocksError(RuntimeError):
    """More blocks were asked for than are free (callers check `can_allocate` first)."""


def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """K and V of every layer for `block_size` tokens."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.kv_size * item


def prefix_root(task: str | None, sha256: str | None) -> bytes:
    """The hash every chain of one task version starts from: blocks of two versions, of two tasks, or of
    a task and the base never share a hash (the sha256 is fixed-length hex, so the key is unambiguous)."""
    key = BASE_KEY if task is None else b"task\0" + task.encode() + b"\0" + (sha256 or "").encode()
    return hashlib.sha256(b"deltaserve/prefix/v1\0" + key).digest()


def block_hash(parent: bytes, tokens: Iterable[int]) -> bytes:
    """The hash of one full block: its parent's hash (32 bytes) and its token ids."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class KVCache:
    """The block pool of every layer's K and V, its reference counts and the prefix cache's index."""

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
        self._refs = [0] * self.num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()
        """Published blocks no sequence holds, least recently released first: the eviction order."""
        self.evictions = 0
        """Published blocks whose hash was forgotten to reuse them (the free list was empty)."""

    @property
    def free_blocks(self) -> int:
        """Blocks a sequence can be given: free ones and idle published ones."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Published blocks, held or idle."""
        return len(self._hash_of)

    def blocks_needed(self, held: int, tokens: int) -> int:
        """Extra blocks a sequence holding `held` blocks needs to store `tokens` tokens in all."""
        return max(0, -(-tokens // self.block_size) - held)

    def can_allocate(self, count: int, claiming: Iterable[int] = ()) -> bool:
        """`count` blocks can be allocated after the cached blocks `claiming` are claimed."""
        taken = sum(1 for block in claiming if block in self._idle)
        return count <= self.free_blocks - taken

    def allocate(self, count: int) -> list[int]:
        """`count` blocks for one sequence: free ones first, then the least recently used idle ones."""
        if count > self.free_blocks:
            raise OutOfBlocksError(f"asked for {count} blocks, {self.free_blocks} free")
        blocks = [self._take() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._idle.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        self.evictions += 1
        return block

    def free(self, blocks: list[int], drop: bool = False) -> None:
        """Release one sequence's blocks. A published block nobody else holds goes idle (reusable by its
        hash) unless `drop`, which forgets its hash (the sequence failed: its K/V may be bad). Tail
        blocks are released first, so they are evicted before the prefixes that lead to them."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._hash_of and not drop:
                self._idle[block] = None
                continue
            if block in self._hash_of:
                del self._block_of[self._hash_of.pop(block)]
            self._free.append(block)

    def match(self, hashes: Iterable[bytes]) -> list[int]:
        """The published blocks of the longest leading run of `hashes` (not claimed)."""
        blocks: list[int] = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def claim(self, blocks: list[int]) -> None:
        """Hold published blocks found by `match` for one more sequence (read-only)."""
        for block in blocks:
            self._idle.pop(block, None)
            self._refs[block] += 1

    def publish(self, block: int, digest: bytes) -> None:
        """Make a held, fully computed block findable by `digest`; a no-op when the block is published
        already or another block holds that hash (two sequences computed the same prefix at once)."""
        if block in self._hash_of or digest in self._block_of:
            return
        self._hash_of[block] = digest
        self._block_of[digest] = block

    def token_slots(self, blocks: list[int], length: int) -> torch.Tensor:
        """[length] int64: the flat cache slot of each of a sequence's first `length` tokens."""
        table = torch.tensor(blocks, dtype=torch.int64)
        offsets = torch.arange(self.block_size, dtype=torch.int64)
        return (table[:, None] * self.block_size + offsets[None, :]).reshape(-1)[:length]
