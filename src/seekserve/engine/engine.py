"""LLMEngine: the synchronous core. `step()` is schedule -> run -> sample -> postprocess; `generate()`
is the offline batch call (like vLLM's `LLM.generate`). Not thread-safe: `AsyncEngine` drives it from
one thread."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from seekserve.engine.config import EngineConfig, ResolvedConfig, resolve_device, resolve_dtype
from seekserve.engine.errors import InvalidRequestError, ModelLoadError
from seekserve.engine.kv_cache import BlockManager
from seekserve.engine.loader import load_weights, resolve_model_path
from seekserve.engine.memory import kv_cache_budget_bytes
from seekserve.engine.models.arch import ModelArchConfig, parse_arch_config
from seekserve.engine.models.registry import SUPPORTED_ARCHITECTURES, build_model
from seekserve.engine.output_processor import append_token, make_output
from seekserve.engine.outputs import CompletionOutput, IncrementalOutput, RequestOutput
from seekserve.engine.params import SamplingParams
from seekserve.engine.runner import ModelRunner, kv_bytes_per_block
from seekserve.engine.sampler import Sampler
from seekserve.engine.scheduler import Scheduler
from seekserve.engine.sequence import Sequence
from seekserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("seekserve.engine")

Prompt = str | list[int]


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request, ready to enter the scheduler (built outside the engine thread)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    cache_salt: bytes | None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float       # share of KV blocks in use, 0..1
    num_prefix_queries: int     # prompt tokens looked up in the prefix cache
    num_prefix_hits: int        # of which were found
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        folder = resolve_model_path(config.model_path)
        self.model_path = folder
        self.arch: ModelArchConfig = parse_arch_config(folder / "config.json", SUPPORTED_ARCHITECTURES)
        self.tokenizer = Tokenizer(folder)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, self.arch.torch_dtype, device)
        max_model_len = self._resolve_max_model_len(config, self.arch)
        self.eos_token_ids = self._eos_token_ids(folder)

        model = self._load_model(folder, device, dtype, max_model_len)
        t1 = time.perf_counter()
        log.info("load weights: %.2fs (%s, %s on %s)", t1 - t0, self.arch.architecture, dtype, device)

        per_block = kv_bytes_per_block(self.arch.num_layers, config.block_size, self.arch.num_kv_heads,
                                       self.arch.head_dim, dtype)
        budget = kv_cache_budget_bytes(config.kv_cache_memory_gb, config.kv_cache_memory_fraction, device)
        num_blocks = budget // per_block
        needed = -(-max_model_len // config.block_size)
        if config.kv_cache_memory_gb is None:
            # a derived budget never exceeds what a full batch of full-length sequences can use, twice over
            # (the rest keeps cached prefixes): a small model must not zero gigabytes at start-up
            num_blocks = min(num_blocks, 2 * needed * config.max_num_seqs)
        if num_blocks < needed:
            raise InvalidRequestError(
                f"the KV cache budget ({budget / 2**30:.3f} GiB = {num_blocks} blocks of {config.block_size} "
                f"tokens) cannot hold one sequence of max_model_len={max_model_len} tokens ({needed} blocks); "
                "raise the KV cache memory or lower max_model_len", param="kv_cache_memory_gb")
        self.resolved = ResolvedConfig(device=device, dtype=dtype, max_model_len=max_model_len,
                                       num_blocks=num_blocks, block_size=config.block_size,
                                       kv_cache_bytes=num_blocks * per_block)
        self.runner = ModelRunner(model, num_blocks, config.block_size, device, dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.preempt_for_priority, config.num_reserved_slots)
        self.sampler = Sampler(tuple(self.eos_token_ids), device, config.seed)
        self._requests: dict[str, list[Sequence]] = {}
        t2 = time.perf_counter()
        log.info("allocate KV cache: %.2fs (%d blocks x %d tokens, %.2f GiB)", t2 - t1, num_blocks,
                 config.block_size, self.resolved.kv_cache_bytes / 2**30)
        self._warm_up()
        log.info("warm-up: %.2fs", time.perf_counter() - t2)

    # -- start-up helpers ---------------------------------------------------------------------
    @staticmethod
    def _resolve_max_model_len(config: EngineConfig, arch: ModelArchConfig) -> int:
        limit = arch.max_position_embeddings
        if arch.rope_scaling and arch.rope_scaling.get("rope_type") in ("yarn", "dynamic", "linear", "llama3"):
            limit = max(limit, int(arch.rope_scaling.get("original_max_position_embeddings", limit)
                                   * arch.rope_scaling.get("factor", 1.0)))
        if config.max_model_len is None:
            # dynamic NTK only rescales when a longer context is asked for explicitly
            dynamic = bool(arch.rope_scaling) and arch.rope_scaling.get("rope_type") == "dynamic"
            return arch.max_position_embeddings if dynamic else limit
        if config.max_model_len > limit:
            raise InvalidRequestError(f"max_model_len={config.max_model_len} exceeds the model's limit "
                                      f"({limit} positions, from config.json)", param="max_model_len")
        return config.max_model_len

    def _eos_token_ids(self, folder: Path) -> frozenset[int]:
        ids = set(self.arch.eos_token_ids)
        gen = folder / "generation_config.json"
        if gen.exists():
            try:
                value = json.loads(gen.read_text()).get("eos_token_id")
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{gen} is not valid JSON: {e}") from None
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    def _load_model(self, folder: Path, device: torch.device, dtype: torch.dtype, max_model_len: int):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = build_model(self.arch, max_model_len)
        finally:
            torch.set_default_dtype(previous)
        model.rotary.to(torch.float32)  # the cos/sin table stays float32, cast per step like transformers
        self.weight_bytes = load_weights(folder, model.checkpoint_targets()).num_bytes
        if device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            model.pack_for_cpu()
        return model.eval()

    def _warm_up(self) -> None:
        """One short generation so kernels are initialized before the first real request."""
        self.generate([[self.tokenizer.bos_token_id or 0] * 8], SamplingParams(max_tokens=2, temperature=0.0))
        self.block_manager.reset_prefix_cache()
        self.block_manager.num_prefix_hits = self.block_manager.num_prefix_queries = 0

    # -- requests -----------------------------------------------------------------------------
    def prepare_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                        priority: int = 0, cache_salt: str | bytes | None = None) -> PreparedRequest:
        """Validate and tokenize. Thread-safe (touches no engine state); raises InvalidRequestError."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        self.check_token_ids(ids)
        max_len = self.resolved.max_model_len
        if len(ids) >= max_len:
            raise InvalidRequestError(f"the prompt has {len(ids)} tokens, but this model's context is {max_len} "
                                      "tokens (the prompt must leave room for at least one output token)",
                                      param="prompt")
        vocab = self.arch.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if params.logprobs is not None and params.logprobs > self.config.max_logprobs:
            raise InvalidRequestError(f"logprobs must be at most {self.config.max_logprobs}", param="logprobs")
        salt = cache_salt.encode() if isinstance(cache_salt, str) else cache_salt
        return PreparedRequest(request_id, ids, params, priority, salt)

    def check_token_ids(self, ids: list[int]) -> None:
        """Raises InvalidRequestError unless every id is in this model's vocabulary."""
        vocab = self.arch.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")

    def add_prepared(self, req: PreparedRequest) -> None:
        if req.request_id in self._requests:
            raise InvalidRequestError(f"request id {req.request_id!r} is already in use", param="request_id")
        seqs = []
        for i in range(req.params.n):
            gen = None if req.params.seed is None else self.sampler.make_generator(req.params.seed + i)
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens)
            seqs.append(Sequence(req.request_id, i, req.prompt_token_ids, req.params, req.priority, detok, gen,
                                 req.cache_salt))
        self._requests[req.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    priority: int = 0, cache_salt: str | bytes | None = None) -> None:
        """Queue a request; `priority` lower runs first. Raises InvalidRequestError for bad input."""
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority, cache_salt))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is; its KV blocks are freed now."""
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, bm.usage,
                           bm.num_prefix_queries, bm.num_prefix_hits, self.scheduler.num_preemptions)

    # -- the step -----------------------------------------------------------------------------
    def step(self) -> list[IncrementalOutput]:
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        ordered = ModelRunner.sampled_order(sched.scheduled)
        logits = self.runner.execute(ordered)
        sampled = [s.seq for s in ordered if s.is_sampled]
        self.scheduler.update_after_step(sched)
        tokens, logprobs = self.sampler.sample(logits, sampled)
        outputs = []
        for seq, token, lp in zip(sampled, tokens, logprobs):
            append_token(seq, token, lp, self.eos_token_ids, self.resolved.max_model_len)
            out = make_output(seq)
            if seq.finish_reason is not None:
                self._finish(seq)
            if out is not None:
                outputs.append(out)
        return outputs

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        siblings = self._requests.get(seq.request_id, [])
        if all(s.is_finished for s in siblings):
            self._requests.pop(seq.request_id, None)

    # -- offline ------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 priorities: list[int] | None = None) -> list[RequestOutput]:
        """Run prompts to completion; results in the order of `prompts`."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("params must be one SamplingParams or one per prompt", param="params")
        results: dict[str, RequestOutput] = {}
        order = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            rid = f"gen-{uuid.uuid4().hex[:12]}-{i}"
            req = self.prepare_request(rid, prompt, p, priorities[i] if priorities else 0)
            self.add_prepared(req)
            results[rid] = RequestOutput(rid, req.prompt_token_ids, [CompletionOutput(j) for j in range(p.n)])
            order.append(rid)
        while any(not results[r].finished for r in order):
            for out in self.step():
                result = results.get(out.request_id)
                if result is not None:
                    result.outputs[out.index].add(out)
                    result.num_cached_tokens = max(result.num_cached_tokens, out.num_cached_tokens)
        return [results[r] for r in order]
