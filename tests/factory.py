"""Tiny random-init Hugging Face checkpoints built inside the tests (no download): a byte-level BPE
tokenizer trained on a few lines of English and Chinese, and a Llama or Qwen2 model saved with
`transformers.save_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n",
    "What is 37 + 45? The answer is 82. What is 12 + 30? The answer is 42.",
    "深度求索是一家人工智能公司。我们在本地运行模型，数据不出域。",
    "你好，世界！今天天气很好。银行、医院和政府机构都需要私有部署。",
    "Hello world, hello seekserve. Paged attention and prefix caching make serving fast.",
] * 20


def train_tokenizer(vocab_size: int = 400) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def make_checkpoint(out: Path, arch: str = "llama", vocab_size: int = 512, dtype: torch.dtype = torch.float32,
                    seed: int = 0, max_shard_size: str | None = None, chat_template_file: bool = False,
                    **config: Any) -> Path:
    """Build and save a tiny model; `config` overrides the transformers config fields."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(min(vocab_size, 400))
    tok.save(str(out / "tokenizer.json"))
    tok_config: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                                  "tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template_file:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        tok_config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(config)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**base))
    elif arch == "qwen2":
        base.setdefault("tie_word_embeddings", True)
        model = Qwen2ForCausalLM(Qwen2Config(**base))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # random init is tiny; widen it so greedy choices are well separated
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    return out
