"""BlockManager: exact block ids for allocation, free order, prefix-cache hits and eviction, plus a
stateful property test of its invariants."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from seekserve.engine import kv_cache
from seekserve.engine.kv_cache import BlockManager, hash_block
from seekserve.engine.params import SamplingParams
from seekserve.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(token_ids: list[int], salt: bytes | None = None) -> Sequence:
    return Sequence(f"req-{next(_ids)}", 0, list(token_ids), SamplingParams(), priority=0, detokenizer=None,
                    generator=None, cache_salt=salt)


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> list[int]:
    """Scheduler-style admission: look up the cache, allocate, start from the cached count."""
    computed = bm.get_computed_blocks(seq)
    total = seq.num_tokens if num_tokens is None else num_tokens
    assert bm.can_allocate(computed, total)
    bm.allocate(seq, computed, total)
    seq.num_computed_tokens = len(computed) * bm.block_size
    return computed


def compute(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """Pretend the model computed the sequence up to `upto` tokens, and register full blocks."""
    seq.num_computed_tokens = seq.num_tokens if upto is None else upto
    bm.cache_full_blocks(seq)


def free_list(bm: BlockManager) -> list[int]:
    return list(bm.free_block_ids)


A = list(range(100, 110))  # 10 tokens: two full blocks of 4 and a partial one


# -- allocation and free order --------------------------------------------------------------------
def test_allocate_takes_lowest_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(A)
    bm.allocate(seq, [], 10)
    assert seq.block_table == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert free_list(bm) == [3, 4, 5, 6, 7]
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)


def test_num_blocks_for_rounds_up():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.num_blocks_for(n) for n in (0, 1, 3, 4, 5, 8, 9)] == [0, 1, 1, 1, 2, 2, 3]


def test_free_puts_tail_first_then_next_allocation_order_is_predictable():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(A)
    bm.allocate(seq, [], 10)
    bm.free(seq)
    assert seq.block_table == [] and seq.block_hashes == []
    assert free_list(bm) == [3, 4, 5, 6, 7, 2, 1, 0]
    assert all(b.ref_count == 0 for b in bm.blocks)

    s1, s2 = make_seq(range(12)), make_seq(range(50, 70))
    bm.allocate(s1, [], 12)
    assert s1.block_table == [3, 4, 5]
    bm.allocate(s2, [], 20)
    assert s2.block_table == [6, 7, 2, 1, 0]
    assert bm.num_free_blocks == 0
    assert not bm.can_allocate([], 1)


def test_append_slots_grows_block_by_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(3))
    bm.allocate(seq, [], 3)
    assert seq.block_table == [0]
    bm.append_slots(seq, 4)            # still fits in block 0
    assert seq.block_table == [0]
    bm.append_slots(seq, 5)
    assert seq.block_table == [0, 1]
    bm.append_slots(seq, 13)
    assert seq.block_table == [0, 1, 2, 3]
    bm.append_slots(seq, 2)            # never shrinks
    assert seq.block_table == [0, 1, 2, 3]


def test_shared_prefix_is_freed_last():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    b = make_seq(A[:8] + [1, 2, 3])
    assert admit(bm, b) == [0, 1]
    assert b.block_table == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    bm.free(a)
    assert free_list(bm) == [4, 5, 6, 7, 2]       # only a's private tail block
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    bm.free(b)
    assert free_list(bm) == [4, 5, 6, 7, 2, 3, 1, 0]
    assert all(b.ref_count == 0 for b in bm.blocks)


# -- hashing and prefix-cache hits ------------------------------------------------------------------
def test_cache_full_blocks_registers_only_computed_full_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(A)
    admit(bm, seq)
    compute(bm, seq, upto=3)
    assert seq.block_hashes == [] and bm.hash_to_block_id == {}
    compute(bm, seq, upto=7)
    h0 = hash_block(None, tuple(A[:4]), None)
    assert seq.block_hashes == [h0]
    assert bm.hash_to_block_id == {h0: 0}
    assert bm.blocks[0].hash == h0 and bm.blocks[0].token_ids == tuple(A[:4])
    compute(bm, seq, upto=10)
    h1 = hash_block(h0, tuple(A[4:8]), None)
    assert seq.block_hashes == [h0, h1]
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    assert bm.blocks[1].token_ids == tuple(A[4:8])
    assert bm.blocks[2].hash is None            # partial block never cached


def test_hash_is_chained_and_salted():
    t = (1, 2, 3, 4)
    assert hash_block(None, t, None) == hash_block(None, list(t), None)
    assert hash_block(None, t, None) != hash_block(None, t, b"a")
    assert hash_block(None, t, None) != hash_block(hash_block(None, t, None), t, None)
    assert hash_block(None, (1, 23), None) != hash_block(None, (12, 3), None)
    assert len(hash_block(None, t, None)) == 16


def test_freed_cached_blocks_are_reused_by_same_prefix():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert free_list(bm) == [3, 4, 5, 6, 7, 2, 1, 0]

    b = make_seq(A[:8] + [99, 98])
    computed = bm.get_computed_blocks(b)
    assert computed == [0, 1]
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (0, 0)     # lookups alone are not counted
    assert bm.can_allocate(computed, 10)
    bm.allocate(b, computed, 10)
    b.num_computed_tokens = 8
    assert b.block_table == [0, 1, 3]
    assert b.block_hashes == [bm.blocks[0].hash, bm.blocks[1].hash]
    assert free_list(bm) == [4, 5, 6, 7, 2]
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]

    # computing the rest registers b's third block on top of the reused chain
    compute(bm, b)
    assert b.block_hashes == [bm.blocks[0].hash, bm.blocks[1].hash]   # the third block is partial
    b.token_ids += [97, 96]
    compute(bm, b)
    h2 = hash_block(bm.blocks[1].hash, (99, 98, 97, 96), None)
    assert b.block_hashes[2] == h2 and bm.hash_to_block_id[h2] == 3


def test_running_sequences_share_cached_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    b = make_seq(A[:9])
    assert bm.get_computed_blocks(b) == [0, 1]
    # a still holds 0 and 1: reusing them takes no free block, only the new tail does
    assert bm.can_allocate([0, 1], 9)
    admit(bm, b)
    assert b.block_table == [0, 1, 3]
    assert bm.blocks[0].ref_count == 2 and bm.blocks[1].ref_count == 2


def test_never_hit_the_last_token():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    # exactly two full blocks: the last token must be computed, so only the first block hits
    assert bm.get_computed_blocks(make_seq(A[:8])) == [0]
    assert bm.get_computed_blocks(make_seq(A[:9])) == [0, 1]
    assert bm.get_computed_blocks(make_seq(A[:4])) == []
    assert bm.get_computed_blocks(make_seq(A[:5])) == [0]
    assert bm.get_computed_blocks(make_seq([])) == []


def test_prefix_must_match_from_the_start():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    # same second block, different first block: the chain breaks at block 0
    assert bm.get_computed_blocks(make_seq([0, 0, 0, 0] + A[4:10])) == []
    # first block matches, second differs
    assert bm.get_computed_blocks(make_seq(A[:4] + [0, 0, 0, 0, 1])) == [0]


def test_different_salt_no_hit():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A, salt=b"a")
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert bm.get_computed_blocks(make_seq(A, salt=None)) == []
    assert bm.get_computed_blocks(make_seq(A, salt=b"b")) == []
    assert bm.get_computed_blocks(make_seq(A, salt=b"a")) == [0, 1]


def test_hit_is_verified_against_stored_tokens(monkeypatch):
    # a hash that ignores the tokens makes every block collide: the stored token ids must stop the hit
    monkeypatch.setattr(kv_cache, "hash_block", lambda parent, tokens, salt: (parent or b"") + b"x")
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert len(bm.hash_to_block_id) == 2
    assert bm.get_computed_blocks(make_seq([7] * 10)) == []
    assert bm.get_computed_blocks(make_seq(A[:4] + [7] * 6)) == [0]
    assert bm.get_computed_blocks(make_seq(A)) == [0, 1]


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    assert a.block_hashes == [] and bm.hash_to_block_id == {}
    bm.free(a)
    assert bm.get_computed_blocks(make_seq(A)) == []


def test_reset_prefix_cache_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    c = make_seq([5, 6, 7, 8, 9])
    admit(bm, c)
    compute(bm, c)
    assert c.block_table == [3, 4]
    hc = bm.blocks[3].hash
    assert hc is not None
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.hash_to_block_id == {hc: 3}              # the live sequence's block stays cached
    assert all(bm.blocks[i].hash is None and bm.blocks[i].token_ids == () for i in (0, 1, 2))
    assert bm.get_computed_blocks(make_seq(A)) == []
    assert bm.get_computed_blocks(make_seq([5, 6, 7, 8, 9])) == [3]
    assert free_list(bm) == [5, 6, 7, 2, 1, 0]          # order unchanged


def test_eviction_is_lru_front_first_and_forgets_hash():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    h0, h1 = a.block_hashes
    bm.free(a)
    assert free_list(bm) == [3, 4, 5, 6, 7, 2, 1, 0]

    x = make_seq(range(200, 220))                       # 5 blocks: the never-used ones go first
    admit(bm, x)
    assert x.block_table == [3, 4, 5, 6, 7]
    assert bm.hash_to_block_id == {h0: 0, h1: 1}
    y = make_seq(range(300, 308))                       # 2 blocks: 2 (uncached), then 1 (cached) is evicted
    admit(bm, y)
    assert y.block_table == [2, 1]
    assert bm.hash_to_block_id == {h0: 0}
    assert bm.blocks[1].hash is None and bm.blocks[1].token_ids == ()
    assert free_list(bm) == [0]
    # the chain now breaks at block 1
    assert bm.get_computed_blocks(make_seq(A)) == [0]
    z = make_seq(range(400, 402))
    admit(bm, z)
    assert z.block_table == [0]
    assert bm.hash_to_block_id == {}
    assert bm.get_computed_blocks(make_seq(A)) == []


def test_revived_block_goes_to_back_of_free_list():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(A[:5])
    admit(bm, a)
    compute(bm, a)
    assert a.block_table == [0, 1]
    bm.free(a)
    assert free_list(bm) == [2, 3, 1, 0]
    b = make_seq(A[:6])
    assert admit(bm, b) == [0]
    assert b.block_table == [0, 2]
    bm.free(b)
    assert free_list(bm) == [3, 1, 2, 0]                # block 0 was used again: evicted last


def test_duplicate_content_keeps_first_block_in_map():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(A[:5]), make_seq(A[:5])
    admit(bm, a)
    admit(bm, b)                                         # before a is computed: no hit
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    compute(bm, a)
    compute(bm, b)
    h0 = hash_block(None, tuple(A[:4]), None)
    assert a.block_hashes == b.block_hashes == [h0]
    assert bm.hash_to_block_id == {h0: 0}
    assert bm.blocks[2].hash == h0
    bm.free(a)
    bm.free(b)
    assert bm.get_computed_blocks(make_seq(A[:5])) == [0]


# -- boundaries ------------------------------------------------------------------------------------
def test_can_allocate_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    filler = make_seq(range(20))
    admit(bm, filler)                                    # 5 blocks, 3 free
    assert bm.num_free_blocks == 3
    assert bm.can_allocate([], 12)
    assert not bm.can_allocate([], 13)


def test_can_allocate_counts_revived_cached_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(A)
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    filler = make_seq(range(200, 220))
    admit(bm, filler)
    assert filler.block_table == [3, 4, 5, 6, 7]
    assert free_list(bm) == [2, 1, 0]
    b = make_seq(A[:9] + [0, 0, 0])
    computed = bm.get_computed_blocks(b)
    assert computed == [0, 1]
    # 2 revived + 1 new = 3 free blocks: fits; 2 revived + 2 new does not
    assert bm.can_allocate(computed, 12)
    assert not bm.can_allocate(computed, 13)
    bm.allocate(b, computed, 12)
    assert b.block_table == [0, 1, 2]
    assert bm.num_free_blocks == 0


def test_can_allocate_shared_live_blocks_cost_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(A[:9])
    admit(bm, a)
    compute(bm, a)
    assert a.block_table == [0, 1, 2]
    b = make_seq(A[:8] + [1, 2, 3, 4, 5])
    computed = bm.get_computed_blocks(b)
    assert computed == [0, 1]
    assert bm.num_free_blocks == 1
    assert bm.can_allocate(computed, 12)
    assert not bm.can_allocate(computed, 13)


def test_can_append_boundary():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(range(8))
    admit(bm, seq)
    other = make_seq(range(100, 112))
    admit(bm, other)
    assert bm.num_free_blocks == 3
    assert bm.can_append(seq, 8)
    assert bm.can_append(seq, 20)                         # 5 blocks = 2 held + 3 free
    assert not bm.can_append(seq, 21)
    bm.append_slots(seq, 20)
    assert seq.block_table == [0, 1, 5, 6, 7]
    assert bm.num_free_blocks == 0
    assert bm.can_append(seq, 20)
    assert not bm.can_append(seq, 21)


# -- stateful property test ------------------------------------------------------------------------
NUM_BLOCKS, BLOCK_SIZE = 8, 4
CHUNKS = [(0, 0, 0, 0), (0, 1, 2, 0), (1, 1, 1, 1)]


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(NUM_BLOCKS, BLOCK_SIZE)
        self.pending: list[Sequence] = []    # hold no blocks (new or preempted)
        self.live: list[Sequence] = []       # hold blocks
        self.free_order = list(range(NUM_BLOCKS))   # reference model of the free list (eviction order)

    def _take(self, n: int) -> list[int]:
        taken, self.free_order = self.free_order[:n], self.free_order[n:]
        return taken

    @precondition(lambda self: len(self.pending) < 3)
    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20), salt=st.sampled_from([None, b"a"]))
    def create(self, tokens, salt):
        self.pending.append(make_seq(tokens, salt))

    @precondition(lambda self: len(self.pending) < 3)
    @rule(chunks=st.lists(st.sampled_from(CHUNKS), min_size=0, max_size=4),
          tail=st.lists(st.integers(0, 2), max_size=4), salt=st.sampled_from([None, b"a"]))
    def create_from_chunks(self, chunks, tail, salt):
        """Prompts built from a few whole blocks, so that prefixes often collide."""
        tokens = [t for c in chunks for t in c] + tail
        if tokens:
            self.pending.append(make_seq(tokens, salt))

    @precondition(lambda self: len(self.pending) < 3 and (self.pending or self.live))
    @rule(data=st.data(), salt=st.sampled_from([None, b"a"]))
    def fork(self, data, salt):
        """A new prompt sharing a prefix with an existing sequence."""
        src = data.draw(st.sampled_from(self.pending + self.live))
        n = data.draw(st.integers(0, src.num_tokens))
        tail = data.draw(st.lists(st.integers(0, 2), max_size=6))
        if n + len(tail):
            self.pending.append(make_seq(src.token_ids[:n] + tail, salt))

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def admit(self, data):
        seq = data.draw(st.sampled_from(self.pending))
        bm, bs = self.bm, BLOCK_SIZE
        computed = bm.get_computed_blocks(seq)
        num_cached = len(computed) * bs
        assert num_cached < seq.num_tokens
        assert len(set(computed)) == len(computed)
        for i, b in enumerate(computed):
            assert bm.blocks[b].token_ids == tuple(seq.token_ids[i * bs:(i + 1) * bs])
        num_new = data.draw(st.integers(1, seq.num_tokens - num_cached))
        total = num_cached + num_new
        need = bm.num_blocks_for(total) - len(computed) + sum(bm.blocks[b].ref_count == 0 for b in computed)
        ok = bm.can_allocate(computed, total)
        assert ok == (need <= bm.num_free_blocks)
        if not ok:
            return
        free_before = bm.num_free_blocks
        self.free_order = [b for b in self.free_order if b not in computed]
        expected_new = self._take(bm.num_blocks_for(total) - len(computed))
        bm.allocate(seq, computed, total)
        assert seq.block_table == computed + expected_new
        assert seq.block_table[:len(computed)] == computed
        assert len(seq.block_table) == bm.num_blocks_for(total)
        assert bm.num_free_blocks == free_before - need
        seq.num_computed_tokens = num_cached
        self.pending.remove(seq)
        self.live.append(seq)
        if data.draw(st.booleans()):     # the step ran: the admitted chunk is computed
            seq.num_computed_tokens = total
            bm.cache_full_blocks(seq)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), k=st.integers(1, 8), sampled=st.integers(0, 2))
    def grow(self, data, k, sampled):
        seq = data.draw(st.sampled_from(self.live))
        bm = self.bm
        if seq.num_computed_tokens == seq.num_tokens:       # a decode step sampled new tokens
            seq.token_ids += [sampled] * data.draw(st.integers(1, 3))
        total = min(seq.num_computed_tokens + k, seq.num_tokens)
        held = len(seq.block_table)
        ok = bm.can_append(seq, total)
        assert ok == (bm.num_blocks_for(total) - held <= bm.num_free_blocks)
        if not ok:
            return
        expected_new = self._take(max(0, bm.num_blocks_for(total) - held))
        bm.append_slots(seq, total)
        assert seq.block_table[held:] == expected_new
        assert len(seq.block_table) == max(held, bm.num_blocks_for(total))
        seq.num_computed_tokens = total
        bm.cache_full_blocks(seq)
        assert len(seq.block_hashes) == min(total // BLOCK_SIZE, len(seq.block_table))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), preempt=st.booleans())
    def free(self, data, preempt):
        seq = data.draw(st.sampled_from(self.live))
        for b in reversed(seq.block_table):
            if self.bm.blocks[b].ref_count == 1:
                self.free_order.append(b)
        self.bm.free(seq)
        assert seq.block_table == [] and seq.block_hashes == []
        self.live.remove(seq)
        if preempt:                      # recompute later, keeping its tokens
            seq.num_computed_tokens = 0
            self.pending.append(seq)

    @rule()
    def reset_prefix_cache(self):
        self.bm.reset_prefix_cache()
        for b in self.bm.free_block_ids:
            assert self.bm.blocks[b].hash is None

    @invariant()
    def accounting(self):
        bm = self.bm
        used = sum(1 for b in bm.blocks if b.ref_count > 0)
        assert bm.num_free_blocks + used == bm.num_blocks
        free = list(bm.free_block_ids)
        assert free == self.free_order
        assert len(free) == len(set(free))
        assert set(free) == {b.block_id for b in bm.blocks if b.ref_count == 0}

    @invariant()
    def ref_counts_match_live_sequences(self):
        holders = [0] * NUM_BLOCKS
        for seq in self.live:
            assert len(set(seq.block_table)) == len(seq.block_table)
            for b in seq.block_table:
                holders[b] += 1
        for s in self.pending:
            assert s.block_table == []
        assert [b.ref_count for b in self.bm.blocks] == holders
        assert all(b.ref_count >= 0 for b in self.bm.blocks)

    @invariant()
    def hash_map_is_consistent(self):
        for h, b in self.bm.hash_to_block_id.items():
            assert self.bm.blocks[b].hash == h
        for blk in self.bm.blocks:
            assert (blk.hash is None) == (blk.token_ids == ())
            if blk.hash is not None:
                assert len(blk.token_ids) == BLOCK_SIZE

    @invariant()
    def live_blocks_hold_their_tokens(self):
        bs = BLOCK_SIZE
        for seq in self.live:
            assert len(seq.block_table) >= self.bm.num_blocks_for(seq.num_computed_tokens)
            num_full = seq.num_computed_tokens // bs
            assert len(seq.block_hashes) == num_full
            parent = None
            for i in range(num_full):
                tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                parent = hash_block(parent, tokens, seq.cache_salt)
                assert seq.block_hashes[i] == parent
                blk = self.bm.blocks[seq.block_table[i]]
                # a live sequence's computed full blocks are always cached (reset only touches free ones)
                assert blk.hash == parent
                assert blk.token_ids == tokens
            # a shared block is shared only as the same prefix of the same tenant
            for other in self.live:
                if other is seq:
                    continue
                for i, b in enumerate(seq.block_table):
                    if b in other.block_table:
                        assert other.block_table.index(b) == i
                        assert seq.cache_salt == other.cache_salt


BlockManagerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TestBlockManagerMachine = BlockManagerMachine.TestCase
