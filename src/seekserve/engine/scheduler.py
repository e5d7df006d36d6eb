"""Continuous batching with one rule: each step, every scheduled sequence's `num_computed_tokens`
catches up with its `num_tokens` as far as the token budget allows. Prefill, chunked prefill, decode,
prefix-cache hits and recompute after preemption are all that rule.

Order: running sequences first (best priority first), then waiting ones by (priority, arrival).
When blocks run out, the lowest-priority, latest running sequence is preempted (its blocks freed,
recomputed later). A waiting sequence of strictly better priority may preempt the worst running one
when it cannot otherwise start (no free slot or no blocks). The last `num_reserved_slots` batch slots
are kept for priority-0 (vip) sequences: a dedicated pool, so vip traffic never waits for a slot."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

from seekserve.engine.kv_cache import BlockManager
from seekserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int             # tokens computed for this sequence in this step

    @property
    def is_sampled(self) -> bool:
        """True when this step reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)    # moved back to waiting this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preempt_for_priority: bool = True, num_reserved_slots: int = 0) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.num_reserved_slots = num_reserved_slots   # slots only priority-0 sequences may take
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preempt_for_priority = preempt_for_priority
        self.waiting: list[tuple[tuple[int, int], Sequence]] = []   # heap by sort_key
        self.running: list[Sequence] = []                           # kept sorted by sort_key
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (seq.sort_key, seq))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        self.running.sort(key=lambda s: s.sort_key)
        if self.preempt_for_priority:
            self._preempt_for_waiting_priority(out)
        num_priority_preemptions = len(out.preempted)
        budget = self._schedule_running(out, budget)
        if len(out.preempted) == num_priority_preemptions:
            # no admissions in a step that ran out of blocks: avoids thrashing
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Decodes before prefill chunks (so a long prompt never stalls running generations), each group
        by priority. A victim preempted for blocks is always the worst running sequence; if it was
        already scheduled in this step, its slot and budget are taken back."""
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.sort_key))
        preempted: set[int] = set()
        for seq in order:
            if budget <= 0:
                break
            if seq.seq_id in preempted:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            total = seq.num_computed_tokens + num_new
            while not self.block_manager.can_append(seq, total):
                victim = self.running[-1]
                budget += self._unschedule(victim, out)
                self._preempt(victim, out)
                preempted.add(victim.seq_id)
                if victim is seq:
                    break
            else:
                self.block_manager.append_slots(seq, total)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        return budget

    @staticmethod
    def _unschedule(seq: Sequence, out: SchedulerOutput) -> int:
        """Drop seq from this step's plan; returns the tokens it had been given."""
        for i, s in enumerate(out.scheduled):
            if s.seq is seq:
                del out.scheduled[i]
                return s.num_new_tokens
        return 0

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0][1]
            if seq.priority > 0 and len(self.running) >= self.max_num_seqs - self.num_reserved_slots:
                break  # the remaining slots are vip's; everything behind seq in the heap is no more urgent
            if any(p is seq for p in out.preempted):
                break  # preempted in this very step: re-admitting it would only waste the recompute
            computed = bm.get_computed_blocks(seq)
            num_cached = len(computed) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(computed, num_cached + num_new):
                break
            heapq.heappop(self.waiting)
            bm.allocate(seq, computed, num_cached + num_new)
            seq.num_computed_tokens = num_cached
            if seq.num_cached_tokens is None:  # first admission (not a resume after preemption)
                seq.num_cached_tokens = num_cached
                bm.record_prefix_lookup(seq.num_tokens, num_cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _preempt_for_waiting_priority(self, out: SchedulerOutput) -> None:
        """Let a strictly more urgent waiting sequence start now, preempting the worst running ones."""
        bm = self.block_manager
        while self.waiting and self.running:
            head, worst = self.waiting[0][1], self.running[-1]
            if head.priority >= worst.priority:
                return
            first_chunk = min(head.num_tokens, self.max_num_batched_tokens)
            no_slot = len(self.running) >= self.max_num_seqs - (self.num_reserved_slots if head.priority else 0)
            no_blocks = not bm.can_allocate([], first_chunk)
            if not (no_slot or no_blocks):
                return
            self._preempt(worst, out)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Recompute-style preemption: drop its KV blocks, keep its tokens, requeue it."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        self.add(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance progress for what was computed and register newly full blocks in the prefix cache."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_new_tokens
            self.block_manager.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from wherever it is and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
        seq.status = SequenceStatus.FINISHED
