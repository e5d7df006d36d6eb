"""Sampler: logits processors (penalties, min_tokens, temperature, min-p, top-k, top-p), greedy or
seeded sampling, and logprobs of the raw model distribution. Vectorized over the batch; only rows with a
per-request seed draw their noise from their own generator."""

from __future__ import annotations

import torch

from seekserve.engine import kernels
from seekserve.engine.outputs import TokenLogprobs
from seekserve.engine.sequence import Sequence


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed % (2**64))
        return g

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits: (N, V) float32, one row per sequence -> chosen token ids and logprobs."""
        want_logprobs = [s.params.logprobs for s in seqs]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(k is not None for k in want_logprobs) else None
        logits = self._apply_penalties(logits, seqs)
        logits = self._apply_min_tokens(logits, seqs)
        tokens = kernels.argmax(logits)
        if tokens is None:
            tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            tokens[rows] = self._sample_random(logits[rows], [seqs[i] for i in random_rows])
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return token_list, [None] * len(seqs)
        return token_list, self._logprobs(raw_logprobs, token_list, want_logprobs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return logits
        logits = logits.clone()
        V = logits.shape[1]
        for i in rows:  # one vectorized update per penalized row: counts over the vocabulary
            p, seq = seqs[i].params, seqs[i]
            row = logits[i]
            if p.presence_penalty or p.frequency_penalty:
                out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
                counts = torch.bincount(out, minlength=V)[:V].to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            banned = list(self.eos_token_ids) + list(seqs[i].params.stop_token_ids)
            if banned:
                logits[i, banned] = float("-inf")
        return logits

    def _sample_random(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p, then a draw by the exponential-race (Gumbel-max) trick:
        argmax(p / q) with q ~ Exp(1) picks token i with probability p_i."""
        temps = torch.tensor([s.params.temperature for s in seqs], device=logits.device).unsqueeze(1)
        logits = logits / temps
        probs = torch.softmax(logits, dim=-1)
        min_p = torch.tensor([s.params.min_p for s in seqs], device=logits.device)
        if bool((min_p > 0).any()):
            threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        probs = self._top_k_top_p(probs, seqs)
        q = torch.empty_like(probs)
        seeded = [i for i, s in enumerate(seqs) if s.generator is not None]
        if len(seeded) < len(seqs):
            q.exponential_(generator=self.generator)
        for i in seeded:
            q[i].exponential_(generator=seqs[i].generator)
        return (probs / q).argmax(dim=-1)

    def _top_k_top_p(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        top_k = torch.tensor([s.params.top_k or probs.shape[1] for s in seqs], device=probs.device)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=probs.device)
        if bool((top_k >= probs.shape[1]).all()) and bool((top_p >= 1.0).all()):
            return probs
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[1], device=probs.device).expand_as(sorted_probs)
        # top-k: keep ranks < k, and ties with the k-th value
        kth = sorted_probs.gather(1, (top_k - 1).clamp(max=probs.shape[1] - 1).unsqueeze(1))
        drop = (rank >= top_k.unsqueeze(1)) & (sorted_probs < kth)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        # top-p: keep the smallest prefix whose mass reaches p (of the mass left after top-k/min-p)
        cum = sorted_probs.cumsum(dim=-1)
        mass_before = (cum - sorted_probs) / cum[:, -1:]
        drop = (mass_before >= top_p.unsqueeze(1)) & (rank > 0)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return torch.zeros_like(probs).scatter_(1, order, sorted_probs)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: list[int], want: list[int | None]) -> list[TokenLogprobs | None]:
        k_max = max(k or 0 for k in want)
        top_vals, top_ids = raw.topk(k_max, dim=-1) if k_max else (None, None)
        chosen = raw.gather(1, torch.tensor(tokens, device=raw.device).unsqueeze(1)).squeeze(1).tolist()
        top_vals_l = top_vals.tolist() if top_vals is not None else None
        top_ids_l = top_ids.tolist() if top_ids is not None else None
        result: list[TokenLogprobs | None] = []
        for i, k in enumerate(want):
            if k is None:
                result.append(None)
                continue
            top = tuple(zip(top_ids_l[i][:k], top_vals_l[i][:k])) if k and top_ids_l else ()
            result.append(TokenLogprobs(tokens[i], chosen[i], top))
        return result
