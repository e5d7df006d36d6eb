"""One sequence's state: its tokens, KV block table, progress (`num_computed_tokens` catching up with
`num_tokens`: the single rule behind prefill, chunked prefill, prefix hits and recompute) and output."""

from __future__ import annotations

import enum
import itertools

import torch

from seekserve.engine.outputs import TokenLogprobs
from seekserve.engine.params import SamplingParams
from seekserve.engine.tokenizer import IncrementalDetokenizer

_seq_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PAUSED = "paused"           # preempted for its batch slot only: keeps its KV blocks, resumes as it was
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, index: int, prompt_token_ids: list[int], params: SamplingParams,
                 priority: int, detokenizer: IncrementalDetokenizer, generator: torch.Generator | None,
                 cache_salt: bytes | None = None) -> None:
        self.seq_id = next(_seq_counter)        # also the arrival order
        self.request_id = request_id
        self.index = index
        self.priority = priority
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens: int | None = None   # prefix-cache hit at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []     # hashes of this sequence's full blocks, in order
        self.cache_salt = cache_salt
        self.status = SequenceStatus.WAITING
        self.detokenizer = detokenizer
        self.generator = generator
        self.logprobs: list[TokenLogprobs] = []
        self.num_emitted_tokens = 0             # tokens already reported in an IncrementalOutput
        self.num_emitted_chars = 0              # characters of detokenizer.text already reported
        self.text_end: int | None = None        # text is cut here (a stop string matched)
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def sort_key(self) -> tuple[int, int]:
        """Lower runs first: priority, then arrival."""
        return (self.priority, self.seq_id)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, prio={self.priority}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens}, {self.status.value})")
