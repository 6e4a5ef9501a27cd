"""The KV block pool: free list, reference counts, prefix-cache hashes, and each request's block table.

    pool:   [ b0 | b1 | b2 | ... | bN-1 ]     each block holds `block_size` tokens of KV, all layers
    req A:  block_ids = [b4, b9, b2]          token t lives in block_ids[t // block_size]
    free:   b7 b3 b5 ...                      front is evicted first; a free block may still be cached

A full block gets a hash chained to its parent's: hash(parent_hash, its tokens). A later prompt with the
same prefix reuses the block (refcount + 1) after comparing its stored tokens and parent hash, so even a
hash collision cannot hand out KV computed after another prefix (and SHA-256 makes one infeasible to
craft). Freed blocks keep their hash until the pool needs them back (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pdserve.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """SHA-256 of the parent's digest and this block's tokens: collisions cannot be crafted."""
    return hashlib.sha256((parent or b"") + array("q", tokens).tobytes()).digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    parent: bytes | None = None  # the previous block's hash: compared on a hit along with the tokens
    token_ids: tuple[int, ...] = ()


class BlockManager:
    """Owns every block; requests hold block ids in `request.block_ids`."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def update_hashes(self, request: Request) -> None:
        """Extend `request.block_hashes` to cover every full block of its tokens."""
        bs = self.block_size
        for i in range(len(request.block_hashes), request.num_tokens // bs):
            parent = request.block_hashes[i - 1] if i else None
            request.block_hashes.append(block_hash(parent, request.token_ids[i * bs : (i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The longest cached prefix of full blocks, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self.update_hashes(request)
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[int] = []
        for i, h in enumerate(request.block_hashes[:max_blocks]):
            block_id = self.cached.get(h)
            if block_id is None or not self._matches(self.blocks[block_id], request, i):
                break
            hits.append(block_id)
        return hits

    def _matches(self, block: Block, request: Request, i: int) -> bool:
        bs = self.block_size
        parent = request.block_hashes[i - 1] if i else None
        return block.parent == parent and block.token_ids == tuple(request.token_ids[i * bs : (i + 1) * bs])

    def can_allocate(self, request: Request, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        new_blocks, revived = self._blocks_to_take(request, num_new_tokens, computed or [])
        return new_blocks + revived <= self.num_free_blocks

    def _blocks_to_take(self, request: Request, num_new_tokens: int, computed: list[int]) -> tuple[int, int]:
        """(fresh blocks, cached blocks revived from the free queue) that an allocation takes."""
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        new_blocks = max(0, cdiv(total, self.block_size) - len(request.block_ids) - len(computed))
        revived = sum(1 for b in computed if self.blocks[b].ref_count == 0)
        return new_blocks, revived

    def allocate(self, request: Request, num_new_tokens: int, computed: list[int] | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after `computed` cached blocks).

        All or nothing: returns False and changes nothing when the pool is short.
        """
        if (
            not computed
            and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return True  # its last block has room: most decode steps (10x cheaper than the count below)
        computed = computed or []
        new_blocks, revived = self._blocks_to_take(request, num_new_tokens, computed)
        if new_blocks + revived > self.num_free_blocks:
            return False
        for block_id in computed:
            self._touch(block_id)
        request.block_ids.extend(computed)
        request.block_ids.extend(self._pop_free() for _ in range(new_blocks))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's newly computed full blocks in the prefix cache."""
        bs = self.block_size
        full = request.num_computed_tokens // bs
        if not self.enable_prefix_caching or full <= request.num_registered_blocks:
            return  # no block filled since the last call: most decode steps
        self.update_hashes(request)
        for i in range(request.num_registered_blocks, full):  # only blocks that filled since last time
            block = self.blocks[request.block_ids[i]]
            if block.hash is not None:
                continue
            block.hash = request.block_hashes[i]
            block.parent = request.block_hashes[i - 1] if i else None
            block.token_ids = tuple(request.token_ids[i * bs : (i + 1) * bs])
            self.cached.setdefault(block.hash, block.block_id)
        request.num_registered_blocks = max(request.num_registered_blocks, full)

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks go first in line for eviction."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
                if block.hash is None:
                    self.free_queue.move_to_end(block_id, last=False)
        request.block_ids = []
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> None:
        for block_id in self.free_queue:
            self._forget(self.blocks[block_id])

    def _touch(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._forget(block)
        block.ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash = None
        block.parent = None
        block.token_ids = ()
