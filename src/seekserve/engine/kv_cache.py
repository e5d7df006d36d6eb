"""BlockManager: the paged KV cache's bookkeeping (no tensors here).

Fixed-size blocks with ref counts and a free list kept in eviction order (front = evicted first).
A full block is keyed by a chained hash of (parent hash, salt, its token ids); a freed block keeps its
hash until it is reused, so a later prompt with the same prefix takes it back (automatic prefix
caching). Invariants (property-tested): free + used = total, ref counts >= 0, a block is freed once,
the hash map points only at blocks that hold that hash."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from seekserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None                         # set once the block is full and cached
    token_ids: tuple[int, ...] = field(default=())    # the tokens behind `hash`, checked on a hit


def hash_block(parent: bytes | None, token_ids: tuple[int, ...] | list[int], salt: bytes | None) -> bytes:
    """Chained 128-bit hash; the salt keeps tenants' caches apart."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\0" * 16)
    h.update(salt or b"")
    h.update(b"|")
    h.update(",".join(map(str, token_ids)).encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[bytes, int] = {}
        self.num_prefix_queries = 0   # prompt tokens looked up in the cache (metrics)
        self.num_prefix_hits = 0      # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks matching the sequence's leading full blocks. At least one token is always left
        to compute, since the step needs the last token's logits. Does not change any ref count."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent = self.block_size, [], None
        max_blocks = (seq.num_tokens - 1) // bs
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = hash_block(parent, tokens, seq.cache_salt)
            block_id = self.hash_to_block_id.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted prompt's lookup (metrics: prefix_cache_queries / prefix_cache_hits)."""
        self.num_prefix_queries += num_tokens
        self.num_prefix_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks the sequence has filled (computed) since the last call."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            h = hash_block(parent, tokens, seq.cache_salt)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block_id.setdefault(h, block.block_id)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash of unused blocks (e.g. after warm-up)."""
        for block_id in self.free_block_ids:
            self._forget_hash(self.blocks[block_id])

    # -- allocation ---------------------------------------------------------------------------
    def can_allocate(self, computed_blocks: list[int], num_tokens: int) -> bool:
        """Can a waiting sequence get blocks for `num_tokens`, reusing `computed_blocks`?"""
        num_new = self.num_blocks_for(num_tokens) - len(computed_blocks)
        num_revived = sum(1 for b in computed_blocks if self.blocks[b].ref_count == 0)
        return num_new + num_revived <= self.num_free_blocks

    def allocate(self, seq: Sequence, computed_blocks: list[int], num_tokens: int) -> None:
        assert not seq.block_table, "allocate() is for sequences that hold no blocks"
        for block_id in computed_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_block_ids[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        seq.block_hashes = [self.blocks[b].hash for b in computed_blocks]  # type: ignore[misc]
        self._grow(seq, num_tokens)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        """Can the sequence's table grow to hold `num_tokens` tokens in all?"""
        return self.num_blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        self._grow(seq, num_tokens)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks; the tail goes to the free list first, so shared prefixes
        (the head) are evicted last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        seq.block_hashes = []

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) < self.num_blocks_for(num_tokens):
            seq.block_table.append(self._take_free_block())

    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        self._forget_hash(block)
        block.ref_count = 1
        return block_id

    def _forget_hash(self, block: Block) -> None:
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = None, ()
