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


def make_scripted_checkpoint(out: Path, text: str, template: str | None = None, vocab_size: int = 512,
                             hidden_size: int = 128) -> Path:
    """A real Llama checkpoint whose weights are set so greedy decoding writes `text`, then EOS.

    Every block's output projection is zero, so the last hidden state is the current token's embedding;
    lm_head row `b` is set to the (normalized) embedding of the token that precedes `b` in the script, so
    the argmax after token `a` is its successor. The script starts after the last token of the prompt
    (the chat template's generation prompt), so `text`'s tokens (and that start token) must not repeat."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (ensures tokenizers integration present)

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(400)
    tok.save(str(out / "tokenizer.json"))
    cfg_json: dict[str, Any] = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
                                "tokenizer_class": "PreTrainedTokenizerFast",
                                "chat_template": template or CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    from seekserve.engine.tokenizer import Tokenizer as OurTokenizer

    ours = OurTokenizer(out)
    prompt = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    start = ours.encode(prompt, add_special_tokens=False)[-1]
    script = ours.encode(text, add_special_tokens=False)
    chain = [start, *script, 1]  # 1 = EOS
    assert len(set(chain)) == len(chain), f"script tokens repeat: {chain}"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        emb = torch.randn(vocab_size, hidden_size)
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab_size, hidden_size)
        unit = emb / emb.norm(dim=1, keepdim=True)
        for a, b in zip(chain, chain[1:]):
            head[b] += 40.0 * unit[a]
        model.lm_head.weight.copy_(head)
    model.save_pretrained(out, safe_serialization=True)
    return out
