"""ModelRunner: owns the model and the KV cache tensors; turns a scheduled batch into flat tensors
(input ids, positions, slot mapping, attention groups), runs the model once, and returns the logits of
the sequences that sample this step. Index tensors are built with vectorized ops, not per-token loops."""

from __future__ import annotations

import torch

from seekserve.engine.attention import AttentionMetadata, AttnGroup
from seekserve.engine.models.llama import LlamaForCausalLM
from seekserve.engine.scheduler import ScheduledSeq


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        cfg = model.cfg
        self.model, self.device, self.block_size = model, device, block_size
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # one (key, value) pair per layer; slot s = block_id * block_size + offset
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(cfg.num_layers)]

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> torch.Tensor:
        """Returns float32 logits (num_sampled, vocab), rows in the order of `sampled_order(scheduled)`."""
        ordered = self.sampled_order(scheduled)
        input_ids, positions, meta, logits_index = self._prepare(ordered)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden[logits_index])

    @staticmethod
    def sampled_order(scheduled: list[ScheduledSeq]) -> list[ScheduledSeq]:
        """Decodes (one new token) first, then prefill chunks; the batch and the logits follow this order."""
        return ([s for s in scheduled if s.num_new_tokens == 1]
                + [s for s in scheduled if s.num_new_tokens > 1])

    def _prepare(self, ordered: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                             torch.Tensor]:
        starts = [s.seq.num_computed_tokens for s in ordered]
        lens = [s.num_new_tokens for s in ordered]
        ids: list[int] = []
        for s, start, n in zip(ordered, starts, lens):
            ids.extend(s.seq.token_ids[start:start + n])
        start_t = torch.tensor(starts, dtype=torch.long)
        len_t = torch.tensor(lens, dtype=torch.long)
        max_blocks = max(len(s.seq.block_table) for s in ordered)
        tables = torch.zeros((len(ordered), max_blocks), dtype=torch.long)
        for row, s in enumerate(ordered):
            tables[row, :len(s.seq.block_table)] = torch.tensor(s.seq.block_table, dtype=torch.long)

        seq_of_token = torch.repeat_interleave(torch.arange(len(ordered)), len_t)
        cu = torch.cumsum(len_t, 0) - len_t
        positions = start_t[seq_of_token] + (torch.arange(len(ids)) - cu[seq_of_token])
        slot_mapping = self._slots(tables[seq_of_token], positions)
        num_decode = sum(1 for n in lens if n == 1)
        # decodes are tokens [0, num_decode); prefill chunks follow
        groups = [self._group(tables[a:b], start_t[a:b], len_t[a:b], offset=a) if b > a else None
                  for a, b in ((0, num_decode), (num_decode, len(ordered)))]
        sampled_rows = [i for i, s in enumerate(ordered) if s.is_sampled]
        logits_index = (cu + len_t - 1)[sampled_rows]
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(self.device), decode=groups[0], prefill=groups[1])
        to = self.device
        return torch.tensor(ids, dtype=torch.long).to(to), positions.to(to), meta, logits_index.to(to)

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tables: (..., max_blocks) block ids; positions: (...) -> slot ids (...)."""
        block_idx = torch.div(positions, self.block_size, rounding_mode="floor")
        if block_idx.dim() < tables.dim():   # one position per row of tables
            blocks = tables.gather(-1, block_idx.unsqueeze(-1)).squeeze(-1)
        else:                                # a row of positions per row of tables
            blocks = tables.gather(-1, block_idx)
        return blocks * self.block_size + positions % self.block_size

    def _group(self, tables: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, offset: int) -> AttnGroup:
        """One padded attention call for these sequences, whose new tokens start at flat index `offset`."""
        B = tables.shape[0]
        q_max, kv_lens = int(lens.max()), starts + lens
        k_max = int(kv_lens.max())
        key_pos = torch.arange(k_max).expand(B, k_max)
        kv_slots = self._slots(tables, torch.minimum(key_pos, (kv_lens - 1).unsqueeze(1)))   # (B, Kmax)
        q_off = torch.arange(q_max).expand(B, q_max)
        q_valid = q_off < lens.unsqueeze(1)                                                  # (B, Qmax)
        cu = torch.cumsum(lens, 0) - lens
        query_index = torch.where(q_valid, offset + cu.unsqueeze(1) + q_off, 0)
        q_pos = torch.where(q_valid, starts.unsqueeze(1) + q_off, 0)                         # pads see key 0
        if q_max == 1 and bool((kv_lens == k_max).all()):
            mask = None
        else:
            mask = (key_pos.unsqueeze(1) <= q_pos.unsqueeze(2)).unsqueeze(1)                 # (B, 1, Qmax, Kmax)
        to = self.device
        return AttnGroup(num_tokens=int(lens.sum()), query_index=query_index.to(to),
                         query_valid=None if bool(q_valid.all()) else q_valid.to(to),
                         kv_slots=kv_slots.to(to), mask=None if mask is None else mask.to(to))
