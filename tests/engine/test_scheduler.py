"""Scheduler over a bare BlockManager (no model): steps are simulated the way LLMEngine.step drives it
(schedule, update_after_step, then append one dummy token to every sampled sequence)."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seekserve.engine.kv_cache import BlockManager
from seekserve.engine.params import SamplingParams
from seekserve.engine.scheduler import Scheduler, SchedulerOutput
from seekserve.engine.sequence import Sequence, SequenceStatus

DUMMY = 7
_ids = itertools.count()
_tok = itertools.count(1000)


def make_seq(prompt: int | list[int], priority: int = 0, max_tokens: int = 16,
             salt: bytes | None = None) -> Sequence:
    """`prompt`: explicit token ids, or a length (distinct tokens, so no accidental prefix hits)."""
    tokens = [next(_tok) for _ in range(prompt)] if isinstance(prompt, int) else list(prompt)
    return Sequence(f"req-{next(_ids)}", 0, tokens, SamplingParams(max_tokens=max_tokens), priority,
                    detokenizer=None, generator=None, cache_salt=salt)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, preempt_for_priority: bool = True,
                   num_reserved_slots: int = 0) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_num_batched_tokens,
                     preempt_for_priority=preempt_for_priority, num_reserved_slots=num_reserved_slots)


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step, mirroring LLMEngine.step: sampled seqs are decided before progress advances."""
    out = sched.schedule()
    sampled = [s.seq for s in out.scheduled if s.is_sampled]
    sched.update_after_step(out)
    for seq in sampled:
        seq.token_ids.append(DUMMY)
        if seq.num_output_tokens >= seq.params.max_tokens:
            seq.finish_reason = "length"
            sched.finish(seq)
    return out


def admit(sched: Scheduler, *seqs: Sequence) -> SchedulerOutput:
    """Add the sequences, then run one step."""
    for seq in seqs:
        sched.add(seq)
    return step(sched)


def plan(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seq, s.num_new_tokens) for s in out.scheduled]


def assert_idle_and_clean(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)


# -- budgets ---------------------------------------------------------------------------------------
def test_max_num_seqs_bounds_running_set():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(5, max_tokens=3) for _ in range(4)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert plan(out) == [(seqs[0], 5), (seqs[1], 5)]
    assert sched.running == [seqs[0], seqs[1]]
    assert sched.num_waiting == 2
    assert seqs[2].status is SequenceStatus.WAITING and seqs[2].block_table == []
    for _ in range(2):
        out = step(sched)
        assert plan(out) == [(seqs[0], 1), (seqs[1], 1)]
    assert seqs[0].is_finished and seqs[1].is_finished
    assert sched.num_running == 0
    out = step(sched)
    assert plan(out) == [(seqs[2], 5), (seqs[3], 5)]
    while sched.has_unfinished():
        out = step(sched)
        assert len(out.scheduled) <= 2 and sched.num_running <= 2
    assert all(s.output_token_ids == [DUMMY] * 3 for s in seqs)
    assert_idle_and_clean(sched)


def test_max_num_batched_tokens_bounds_each_step():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b, c = (make_seq(8, max_tokens=4) for _ in range(3))
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert plan(out) == [(a, 8), (b, 2)]              # b is chunked, c cannot start (no budget left)
    assert [s.is_sampled for s in out.scheduled] == [True, False]
    assert out.num_batched_tokens == 10
    assert c.status is SequenceStatus.WAITING
    sched.update_after_step(out)
    a.token_ids.append(DUMMY)
    assert (a.num_computed_tokens, b.num_computed_tokens) == (8, 2)

    out = sched.schedule()
    assert plan(out) == [(a, 1), (b, 6), (c, 3)]
    assert [s.is_sampled for s in out.scheduled] == [True, True, False]
    sched.update_after_step(out)
    a.token_ids.append(DUMMY)
    b.token_ids.append(DUMMY)
    out = step(sched)
    assert plan(out) == [(a, 1), (b, 1), (c, 5)]
    assert out.num_batched_tokens == 7
    while sched.has_unfinished():
        out = step(sched)
        assert out.num_batched_tokens <= 10
    assert_idle_and_clean(sched)


def test_chunked_prefill_alongside_decode():
    sched = make_scheduler(max_num_batched_tokens=8)
    d = make_seq(4, max_tokens=50)
    sched.add(d)
    assert plan(step(sched)) == [(d, 4)]
    long = make_seq(40, max_tokens=2)
    sched.add(long)
    chunks = []
    for _ in range(6):
        out = step(sched)
        assert out.scheduled[0].seq is d and out.scheduled[0].num_new_tokens == 1
        assert d.num_computed_tokens == d.num_tokens - 1
        assert len(out.scheduled) == 2 and out.scheduled[1].seq is long
        assert out.num_batched_tokens <= 8
        chunks.append(out.scheduled[1].num_new_tokens)
    assert chunks == [7, 7, 7, 7, 7, 5]
    assert long.num_computed_tokens == 40 and long.output_token_ids == [DUMMY]
    assert d.output_token_ids == [DUMMY] * 7
    out = step(sched)
    assert plan(out) == [(d, 1), (long, 1)]
    assert long.is_finished


def test_only_the_last_chunk_samples():
    sched = make_scheduler(max_num_batched_tokens=4)
    s = make_seq(10, max_tokens=1)
    sched.add(s)
    samples = []
    while sched.has_unfinished():
        out = sched.schedule()
        samples.append([(x.num_new_tokens, x.is_sampled) for x in out.scheduled])
        sampled = [x.seq for x in out.scheduled if x.is_sampled]
        sched.update_after_step(out)
        for q in sampled:
            q.token_ids.append(DUMMY)
            sched.finish(q)
    assert samples == [[(4, False)], [(4, False)], [(2, True)]]
    assert_idle_and_clean(sched)


# -- ordering --------------------------------------------------------------------------------------
def test_admission_order_is_priority_then_arrival():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=100)
    a, b, c, d = make_seq(4, 1, 1), make_seq(4, 0, 1), make_seq(4, 1, 1), make_seq(4, 0, 1)
    for s in (a, b, c, d):
        sched.add(s)
    order = []
    while sched.has_unfinished():
        out = step(sched)
        order += [x.seq for x in out.scheduled]
    assert order == [b, d, a, c]


def test_one_step_batch_order_is_priority_then_arrival():
    sched = make_scheduler(max_num_batched_tokens=100, preempt_for_priority=False)
    a, b, c, d = make_seq(4, 2), make_seq(4, 0), make_seq(4, 1), make_seq(4, 0)
    for s in (a, b, c, d):
        sched.add(s)
    assert [x.seq for x in step(sched).scheduled] == [b, d, c, a]
    e = make_seq(4, 0)
    sched.add(e)
    assert plan(step(sched)) == [(b, 1), (d, 1), (c, 1), (a, 1), (e, 4)]
    assert sched.running == [b, d, c, a, e]


# -- preemption ------------------------------------------------------------------------------------
def test_out_of_blocks_preempts_lowest_priority_latest_arrival():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=4, max_num_batched_tokens=100,
                           preempt_for_priority=False)
    a = make_seq(4, priority=0, max_tokens=3)
    b = make_seq(4, priority=1, max_tokens=3)
    c = make_seq(4, priority=1, max_tokens=3)   # the worst: low priority, latest of its priority
    d = make_seq(4, priority=0, max_tokens=3)   # latest arrival overall, but high priority
    for s in (a, b, c, d):
        sched.add(s)
    out = step(sched)
    assert [x.seq for x in out.scheduled] == [a, d, b, c]
    assert sched.block_manager.num_free_blocks == 2
    assert all(s.num_tokens == 5 for s in (a, b, c, d))

    # every sequence now needs a second block; only 2 are free
    out = sched.schedule()
    assert out.preempted == [c]
    assert plan(out) == [(a, 1), (d, 1), (b, 1)]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0
    assert c.block_table == [] and c.block_hashes == []
    assert c.token_ids[-1] == DUMMY and c.num_tokens == 5      # tokens are kept for recompute
    assert sched.num_preemptions == 1
    assert sched.running == [a, d, b]
    assert sched.waiting[0][1] is c
    sched.update_after_step(out)
    for s in (a, d, b):
        s.token_ids.append(DUMMY)

    out = step(sched)                                           # a, d, b finish; c still has no room
    assert plan(out) == [(a, 1), (d, 1), (b, 1)]
    assert all(s.is_finished for s in (a, d, b))
    out = step(sched)                                           # c resumes: recompute all 5 tokens
    assert plan(out) == [(c, 5)]
    assert c.num_cached_tokens == 0                             # set at first admission only
    while sched.has_unfinished():
        step(sched)
    assert c.output_token_ids == [DUMMY] * 3
    assert_idle_and_clean(sched)


def test_preempted_sequence_resumes_from_prefix_cache():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=2, max_num_batched_tokens=100,
                           preempt_for_priority=False)
    bm = sched.block_manager
    a = make_seq(6, priority=0, max_tokens=6)
    b = make_seq(5, priority=0, max_tokens=8)
    admit(sched, a, b)
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    step(sched)
    step(sched)
    assert (a.num_tokens, b.num_tokens) == (9, 8)
    out = sched.schedule()                          # a needs a third block: b (same priority, later) goes
    assert out.preempted == [b]
    assert plan(out) == [(a, 1)]
    assert a.block_table == [0, 1, 3]               # b's partial tail block was freed first
    assert list(bm.free_block_ids) == [2]           # b's full first block stays cached
    assert bm.blocks[2].token_ids == tuple(b.token_ids[:4])
    sched.update_after_step(out)
    a.token_ids.append(DUMMY)
    while not a.is_finished:
        out = step(sched)
        assert [x.seq for x in out.scheduled] == [a]  # b does not fit until a is done
    assert list(bm.free_block_ids) == [2, 3, 1, 0]
    out = sched.schedule()
    assert plan(out) == [(b, 4)]                    # 8 tokens, the first block from the cache
    assert b.num_computed_tokens == 4 and b.block_table == [2, 3]
    assert b.num_cached_tokens == 0                 # the first admission's value is kept
    sched.update_after_step(out)
    b.token_ids.append(DUMMY)
    while sched.has_unfinished():
        step(sched)
    assert b.output_token_ids == [DUMMY] * 8
    assert_idle_and_clean(sched)


def test_priority_preemption_schedules_urgent_sequence_immediately():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100, preempt_for_priority=True)
    a, b = make_seq(4, priority=1, max_tokens=10), make_seq(4, priority=1, max_tokens=10)
    admit(sched, a, b)
    step(sched)
    urgent = make_seq(6, priority=0, max_tokens=2)
    sched.add(urgent)
    out = sched.schedule()
    assert out.preempted == [b]
    assert plan(out) == [(a, 1), (urgent, 6)]
    # only a slot was missing: b is paused with its blocks and progress, not recomputed
    assert b.status is SequenceStatus.PAUSED and b.num_computed_tokens == 5 and len(b.block_table) == 2
    assert sched.num_waiting == 1 and sched.paused == [b]
    assert urgent.status is SequenceStatus.RUNNING
    assert sched.num_preemptions == 1
    sched.update_after_step(out)
    for s in (a, urgent):
        s.token_ids.append(DUMMY)
    step(sched)
    assert urgent.is_finished
    out = step(sched)
    assert plan(out) == [(a, 1), (b, 1)]           # b resumes where it stopped: one decode, no recompute
    while sched.has_unfinished():
        step(sched)
    assert b.output_token_ids == [DUMMY] * 10
    assert_idle_and_clean(sched)


def test_priority_preemption_when_out_of_blocks():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=4, max_num_batched_tokens=100,
                           preempt_for_priority=True)
    a, b = make_seq(8, priority=1), make_seq(8, priority=2)
    admit(sched, a, b)
    assert sched.block_manager.num_free_blocks == 0
    urgent = make_seq(3, priority=0, max_tokens=1)
    sched.add(urgent)
    out = sched.schedule()
    assert out.preempted == [b]                                 # the worst priority, not the latest
    assert [x.seq for x in out.scheduled] == [a, urgent]
    assert b.status is SequenceStatus.WAITING and b.block_table == []   # blocks were missing: freed


def test_paused_sequences_give_up_blocks_before_a_running_one_is_preempted():
    sched = make_scheduler(num_blocks=6, block_size=4, max_num_seqs=2, max_num_batched_tokens=100)
    a, b = make_seq(4, priority=1, max_tokens=12), make_seq(4, priority=1, max_tokens=12)
    admit(sched, a, b)
    urgent = make_seq(3, priority=0, max_tokens=12)
    sched.add(urgent)
    step(sched)
    assert b.status is SequenceStatus.PAUSED and len(b.block_table) == 1
    while b.status is SequenceStatus.PAUSED:      # a and urgent grow until the cache is short
        out = step(sched)
        assert a in [x.seq for x in out.scheduled] and urgent in [x.seq for x in out.scheduled]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1                          # giving blocks back is not a second one
    while sched.has_unfinished():
        step(sched)
    assert all(s.num_output_tokens == 12 for s in (a, b, urgent))
    assert_idle_and_clean(sched)


def test_a_queued_sequence_takes_a_paused_ones_blocks_when_more_urgent():
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=1, max_num_batched_tokens=100)
    low = make_seq(7, priority=2, max_tokens=4)
    sched.add(low)
    step(sched)
    mid = make_seq(3, priority=1, max_tokens=1)
    sched.add(mid)
    step(sched)                                                 # low paused (2 blocks), mid runs
    assert low.status is SequenceStatus.PAUSED and mid.is_finished
    urgent = make_seq(12, priority=0, max_tokens=1)             # needs 3 blocks: only 2 are free
    sched.add(urgent)
    out = step(sched)
    assert plan(out) == [(urgent, 12)]
    assert low.status is SequenceStatus.WAITING and low.block_table == []
    while sched.has_unfinished():
        step(sched)
    assert low.num_output_tokens == 4
    assert_idle_and_clean(sched)


def test_finishing_a_paused_sequence_frees_its_blocks():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=100)
    a = make_seq(6, priority=1, max_tokens=5)
    sched.add(a)
    step(sched)
    sched.add(make_seq(2, priority=0, max_tokens=1))
    sched.schedule()
    assert a.status is SequenceStatus.PAUSED
    sched.finish(a)                                             # an abort while paused
    assert a.is_finished and sched.paused == [] and sched.block_manager.num_free_blocks == 63


def test_reserved_slots_are_kept_for_vip():
    sched = make_scheduler(max_num_seqs=4, max_num_batched_tokens=100, num_reserved_slots=1)
    standard = [make_seq(4, priority=1, max_tokens=10) for _ in range(5)]
    for s in standard:
        sched.add(s)
    out = step(sched)
    assert [x.seq for x in out.scheduled] == standard[:3]      # the 4th slot stays free for vip
    vip = make_seq(4, priority=0, max_tokens=2)
    sched.add(vip)
    out = sched.schedule()
    assert out.preempted == [] and vip in [x.seq for x in out.scheduled]
    sched.update_after_step(out)
    for s in (x.seq for x in out.scheduled):
        s.token_ids.append(DUMMY)
    while sched.has_unfinished():
        step(sched)
    assert all(s.num_output_tokens == 10 for s in standard)
    assert_idle_and_clean(sched)


def test_standard_preempts_batch_only_outside_the_reserved_pool():
    sched = make_scheduler(max_num_seqs=3, max_num_batched_tokens=100, num_reserved_slots=1)
    batch = [make_seq(4, priority=2, max_tokens=10) for _ in range(2)]
    for s in batch:
        sched.add(s)
    step(sched)
    standard = make_seq(4, priority=1, max_tokens=2)
    sched.add(standard)
    out = sched.schedule()
    assert out.preempted == [batch[1]]                         # the free slot is vip's, not standard's
    assert [x.seq for x in out.scheduled] == [batch[0], standard]


def test_no_priority_preemption_when_disabled():
    sched = make_scheduler(max_num_seqs=2, max_num_batched_tokens=100, preempt_for_priority=False)
    a, b = make_seq(4, priority=1, max_tokens=3), make_seq(4, priority=1, max_tokens=5)
    admit(sched, a, b)
    urgent = make_seq(6, priority=0, max_tokens=1)
    sched.add(urgent)
    out = step(sched)
    assert out.preempted == [] and plan(out) == [(a, 1), (b, 1)]
    assert urgent.status is SequenceStatus.WAITING
    out = step(sched)                                           # a finishes this step
    assert plan(out) == [(a, 1), (b, 1)] and a.is_finished
    out = step(sched)
    assert plan(out) == [(b, 1), (urgent, 6)]
    assert sched.num_preemptions == 0


def test_equal_priority_never_preempts():
    sched = make_scheduler(max_num_seqs=1, max_num_batched_tokens=100, preempt_for_priority=True)
    a = make_seq(4, priority=1, max_tokens=3)
    sched.add(a)
    step(sched)
    b = make_seq(4, priority=1, max_tokens=1)
    sched.add(b)
    out = step(sched)
    assert out.preempted == [] and plan(out) == [(a, 1)]


# -- prefix cache ----------------------------------------------------------------------------------
def test_prefix_cache_hit_on_admission():
    bs = 4
    sched = make_scheduler(block_size=bs, max_num_batched_tokens=100)
    prefix = list(range(500, 508))                              # two full blocks
    a = make_seq(prefix + [1, 2], max_tokens=4)
    sched.add(a)
    step(sched)
    assert a.num_cached_tokens == 0
    b = make_seq(prefix + [3, 4, 5], max_tokens=4)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [(a, 1), (b, 3)]
    assert b.num_computed_tokens == bs * 2 and b.num_cached_tokens == bs * 2
    assert b.block_table[:2] == a.block_table[:2]
    sched.update_after_step(out)
    assert b.num_computed_tokens == 11
    for x in (a, b):
        x.token_ids.append(DUMMY)

    # a prompt that is exactly the 2-block prefix only hits one block (its last token is computed)
    c = make_seq(list(prefix), max_tokens=1)
    sched.add(c)
    out = step(sched)
    assert plan(out) == [(a, 1), (b, 1), (c, 4)]
    assert c.num_cached_tokens == bs
    # a different salt misses
    d = make_seq(prefix + [9], salt=b"tenant", max_tokens=1)
    sched.add(d)
    out = step(sched)
    assert plan(out) == [(a, 1), (b, 1), (d, 9)]
    assert d.num_cached_tokens == 0
    assert sched.block_manager.num_prefix_hits == 2 * bs + bs


# -- property --------------------------------------------------------------------------------------
request = st.tuples(st.integers(0, 15),      # arrival step
                    st.integers(0, 2),       # priority
                    st.integers(1, 20),      # prompt length
                    st.integers(1, 10),      # max_tokens
                    st.integers(0, 2))       # shared prefix family (prefix-cache hits)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request, min_size=1, max_size=12), num_blocks=st.integers(8, 24),
       max_num_seqs=st.integers(1, 5), budget=st.integers(1, 32), preempt_for_priority=st.booleans())
def test_random_workload_terminates_within_budgets(reqs, num_blocks, max_num_seqs, budget,
                                                   preempt_for_priority):
    bs = 4
    sched = make_scheduler(num_blocks, bs, max_num_seqs, budget, preempt_for_priority)
    bm = sched.block_manager
    seqs = []
    for arrival, prio, n, max_tokens, family in reqs:
        tokens = [family] * min(n, 8) + [next(_tok) for _ in range(n - min(n, 8))]
        seqs.append((arrival, make_seq(tokens, prio, max_tokens)))
    # every sequence fits in the cache on its own (prompt + outputs - the last unsampled token)
    assert all(bm.num_blocks_for(s.num_tokens + s.params.max_tokens) <= num_blocks for _, s in seqs)
    max_steps = 40 + sum(s.num_tokens + s.params.max_tokens for _, s in seqs) * 4
    for t in range(max_steps):
        for arrival, s in seqs:
            if arrival == t:
                sched.add(s)
        if t > 15 and not sched.has_unfinished():
            break
        out = step(sched)
        assert out.num_batched_tokens <= budget
        assert sched.num_running <= max_num_seqs
        assert all(x.num_new_tokens >= 1 for x in out.scheduled)
        ids = [id(x.seq) for x in out.scheduled]
        assert len(ids) == len(set(ids))
        assert not set(map(id, out.preempted)) & set(ids)
        held = [0] * num_blocks
        for s in sched.running + sched.paused:
            assert s.status is (SequenceStatus.RUNNING if s in sched.running else SequenceStatus.PAUSED)
            assert len(s.block_table) == bm.num_blocks_for(s.num_computed_tokens)
            for b in s.block_table:
                held[b] += 1
        assert sched.paused == sorted(sched.paused, key=lambda s: s.sort_key)
        for _, s in sched.waiting:
            assert s.block_table == [] and s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING
        assert [b.ref_count for b in bm.blocks] == held
        assert bm.num_free_blocks == held.count(0)
    else:
        raise AssertionError(f"not finished after {max_steps} steps: {sched.running} {sched.waiting} "
                             f"{sched.paused}")
    for _, s in seqs:
        assert s.is_finished
        assert s.output_token_ids == [DUMMY] * s.params.max_tokens
    assert_idle_and_clean(sched)


def test_decodes_are_served_before_a_more_urgent_long_prefill():
    """A long prompt of better priority is chunked around the running decodes, never stalling them."""
    sched = make_scheduler(max_num_batched_tokens=8, num_blocks=64)
    low = make_seq(3, priority=5, max_tokens=20)
    sched.add(low)
    step(sched)                                   # low is decoding now
    urgent = make_seq(30, priority=0, max_tokens=2)
    sched.add(urgent)
    chunks = []
    while urgent.num_computed_tokens < urgent.num_prompt_tokens:
        out = step(sched)
        assert plan(out)[0] == (low, 1)           # the decode first, every step
        chunks.append(dict(plan(out)).get(urgent))
    assert chunks == [7, 7, 7, 7, 2]
