"""Continuous batching with one rule: each step, every scheduled sequence's `num_computed_tokens`
catches up with its `num_tokens` as far as the token budget allows. Prefill, chunked prefill, decode,
prefix-cache hits and recompute after preemption are all that rule.

Order: running sequences first (best priority first), then the candidates for a slot by (priority,
arrival): paused sequences and waiting ones.
When blocks run out, paused sequences give theirs up first, then the lowest-priority, latest running
sequence is preempted (its blocks freed, recomputed later). A candidate of strictly better priority may
preempt the worst running one when it cannot otherwise start. If it lacks only a slot, the victim is
*paused*: it keeps its KV blocks and later resumes exactly where it stopped (no recompute); if it lacks
blocks, the victim's are freed. The last
`num_reserved_slots` batch slots are kept for priority-0 (vip) sequences: a dedicated pool, so vip
traffic never waits for a slot."""

from __future__ import annotations

import bisect
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
        self.paused: list[Sequence] = []                            # sorted by sort_key; they hold blocks
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for a slot: queued ones and paused ones."""
        return len(self.waiting) + len(self.paused)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.paused)

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
                if self.paused:                 # blocks nobody is using this step go first
                    self._evict_paused()
                    continue
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

    def _next_candidate(self) -> Sequence | None:
        """The most urgent sequence without a slot: the head of the queue or the best paused one."""
        queued = self.waiting[0][1] if self.waiting else None
        paused = self.paused[0] if self.paused else None
        if queued is None or paused is None:
            return queued or paused
        return paused if paused.sort_key < queued.sort_key else queued

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        while budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self._next_candidate()
            if seq is None:
                break
            if seq.priority > 0 and len(self.running) >= self.max_num_seqs - self.num_reserved_slots:
                break  # the remaining slots are vip's; every other candidate is no more urgent
            if any(p is seq for p in out.preempted):
                break  # preempted in this very step: taking it back would only waste the step
            if seq.status is SequenceStatus.PAUSED:
                num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
                if not bm.can_append(seq, seq.num_computed_tokens + num_new):
                    if self.paused[-1] is seq:
                        break
                    self._evict_paused()   # a less urgent paused sequence gives up its blocks
                    continue
                self.paused.remove(seq)
                bm.append_slots(seq, seq.num_computed_tokens + num_new)
            else:
                computed = bm.get_computed_blocks(seq)
                num_cached = len(computed) * bm.block_size
                num_new = min(seq.num_tokens - num_cached, budget)
                if not bm.can_allocate(computed, num_cached + num_new):
                    if not self.paused:
                        break
                    self._evict_paused()   # every paused sequence is less urgent than seq
                    continue
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
        """Let a strictly more urgent candidate start now: the worst running sequence is paused when only
        a slot is missing, preempted (blocks freed) when blocks are."""
        bm = self.block_manager
        while self.running:
            head, worst = self._next_candidate(), self.running[-1]
            if head is None or head.priority >= worst.priority:
                return
            no_slot = len(self.running) >= self.max_num_seqs - (self.num_reserved_slots if head.priority else 0)
            if head.status is SequenceStatus.PAUSED:
                no_blocks = not bm.can_append(head, head.num_tokens)
            else:
                no_blocks = not bm.can_allocate([], min(head.num_tokens, self.max_num_batched_tokens))
            if no_blocks and self.paused and self.paused[-1] is not head:
                self._evict_paused()
            elif no_blocks:
                self._preempt(worst, out)
            elif no_slot:
                self._pause(worst, out)
            else:
                return

    def _pause(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Take seq's slot, keep its blocks and progress: it resumes with no recompute."""
        self.running.remove(seq)
        seq.status = SequenceStatus.PAUSED
        bisect.insort(self.paused, seq, key=lambda s: s.sort_key)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _evict_paused(self) -> None:
        """The least urgent paused sequence gives its blocks back; it will be recomputed (already counted
        as a preemption when it was paused)."""
        seq = self.paused.pop()
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        self.add(seq)

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
        elif seq.status is SequenceStatus.PAUSED:
            self.paused.remove(seq)
            self.block_manager.free(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting = [(k, s) for k, s in self.waiting if s is not seq]
            heapq.heapify(self.waiting)
        seq.status = SequenceStatus.FINISHED
