"""ModelRunner: owns the model and the KV cache tensors; turns a scheduled batch into flat tensors
(input ids, positions, slot mapping, attention groups), runs the model once, and returns the logits of
the sequences that sample this step. Index tensors are built with vectorized ops, not per-token loops."""

from __future__ import annotations

import torch

from seekserve.engine import kernels
from seekserve.engine.attention import AttentionMetadata, AttnGroup
from seekserve.engine.models.llama import LlamaForCausalLM
from seekserve.engine.scheduler import ScheduledSeq


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


# prefill chunks up to this many tokens are attended token by token by the native paged kernel, beside the
# decodes, in place: no cache gather, no padded SDPA call (about 20 fewer ops per layer in such a step)
ROWWISE_CHUNK_TOKENS = 32


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        cfg = model.cfg
        self.model, self.device, self.block_size = model, device, block_size
        k_shape = (num_blocks, cfg.num_kv_heads, cfg.head_dim, block_size)   # keys transposed per block
        v_shape = (num_blocks, cfg.num_kv_heads, block_size, cfg.head_dim)
        self.kv_caches = [(torch.zeros(k_shape, dtype=dtype, device=device),
                           torch.zeros(v_shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]
        # the native kernel reads the cache in place: decodes (and small chunks) need no mask or gather index
        self.native = kernels.kernels_for(self.kv_caches[0][0]) is not None if cfg.num_layers else False

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Returns float32 logits (num_sampled, vocab), rows in the order of `sampled_order(scheduled)`."""
        ordered = self.sampled_order(scheduled)
        input_ids, positions, meta, logits_index = self._prepare(ordered)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[logits_index])

    @staticmethod
    def sampled_order(scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Decodes (one new token) first, then small prefill chunks, then the others; the batch and the
        logits follow this order."""
        return ([s for s in scheduled if s.num_new_tokens == 1]
                + [s for s in scheduled if 1 < s.num_new_tokens <= ROWWISE_CHUNK_TOKENS]
                + [s for s in scheduled if s.num_new_tokens > ROWWISE_CHUNK_TOKENS])

    def _prepare(self, ordered: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                             torch.Tensor]:
        bs = self.block_size
        starts = [s.seq.num_computed_tokens for s in ordered]
        lens = [s.num_new_tokens for s in ordered]
        ids: list[int] = []
        for s, start, n in zip(ordered, starts, lens):
            ids.extend(s.seq.token_ids[start:start + n])
        start_t = torch.tensor(starts, dtype=torch.long)
        len_t = torch.tensor(lens, dtype=torch.long)
        max_blocks = max(len(s.seq.block_table) for s in ordered)
        tables = torch.tensor([s.seq.block_table + [0] * (max_blocks - len(s.seq.block_table)) for s in ordered],
                              dtype=torch.long)                                   # (B, max_blocks)

        seq_of_token = torch.repeat_interleave(torch.arange(len(ordered)), len_t)
        cu = torch.cumsum(len_t, 0) - len_t
        positions = start_t[seq_of_token] + (torch.arange(len(ids)) - cu[seq_of_token])   # (T,)
        write_blocks = tables[seq_of_token, torch.div(positions, bs, rounding_mode="floor")]
        # row-wise: one query row per token with its own causal key count (decodes; with the native kernel
        # also small chunks, whose keys are all in the cache once this step's are written); then the rest
        limit = ROWWISE_CHUNK_TOKENS if self.native else 1
        num_rowwise = sum(1 for n in lens if n <= limit)
        num_rows = sum(lens[:num_rowwise])
        rows = None
        if num_rowwise:
            if num_rows == num_rowwise:   # decodes only: one row per sequence already
                rows = self._rows(tables[:num_rowwise], start_t[:num_rowwise], len_t[:num_rowwise])
            else:
                rows = self._rows(tables[seq_of_token[:num_rows]], positions[:num_rows],
                                  torch.ones(num_rows, dtype=torch.long))
        rest = (self._group(tables[num_rowwise:], start_t[num_rowwise:], len_t[num_rowwise:], offset=num_rows)
                if num_rowwise < len(ordered) else None)
        sampled_rows = [i for i, s in enumerate(ordered) if s.is_sampled]
        logits_index = (cu + len_t - 1)[sampled_rows]
        to = self.device
        meta = AttentionMetadata(write_blocks=write_blocks.to(to), write_offsets=(positions % bs).to(to),
                                 decode=rows, prefill=rest, block_size=bs)
        return torch.tensor(ids, dtype=torch.long).to(to), positions.to(to), meta, logits_index.to(to)

    def _rows(self, tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor) -> AttnGroup:
        """The row-wise group (tokens [0, len(starts))): for the native kernel only tables and key counts."""
        if not self.native:
            return self._group(tables, starts, lens, offset=0)
        to = self.device
        return AttnGroup(num_tokens=int(lens.shape[0]), query_index=None, query_valid=None, mask=None,
                         block_tables=tables.contiguous().to(to), kv_lens=(starts + lens).to(to))

    def _group(self, tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, offset: int) -> AttnGroup:
        """One attention call for these sequences, whose new tokens start at flat index `offset`."""
        B = tables.shape[0]
        kv_lens = starts + lens
        num_blocks = -(-int(kv_lens.max()) // self.block_size)
        tables = tables[:, :num_blocks].contiguous()
        k_max = num_blocks * self.block_size
        q_max = int(lens.max())
        key_pos = torch.arange(k_max).expand(B, k_max)
        q_off = torch.arange(q_max).expand(B, q_max)
        q_valid = q_off < lens.unsqueeze(1)                                                  # (B, Qmax)
        cu = torch.cumsum(lens, 0) - lens
        query_index = torch.where(q_valid, offset + cu.unsqueeze(1) + q_off, 0)
        q_pos = torch.where(q_valid, starts.unsqueeze(1) + q_off, 0)                         # pads see key 0
        mask = (key_pos.unsqueeze(1) <= q_pos.unsqueeze(2)).unsqueeze(1)                     # (B, 1, Qmax, Kmax)
        to = self.device
        is_fresh = bool((starts == 0).all())
        return AttnGroup(num_tokens=int(lens.sum()), query_index=query_index.to(to),
                         query_valid=None if bool(q_valid.all()) else q_valid.to(to), mask=mask.to(to),
                         block_tables=tables.to(to), kv_lens=kv_lens.to(to), is_fresh=is_fresh,
                         is_uniform=is_fresh and bool((lens == q_max).all()))
