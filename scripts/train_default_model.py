#!/usr/bin/env python3
"""Train seekserve's tiny default model: a ~1M-parameter LlamaForCausalLM that adds and subtracts
two numbers from 0 to 99, answering through a DeepSeek-style chat template. No network, no
downloads: the script generates its own data, trains a byte-level BPE tokenizer on it, trains the
model on 2 CPU threads (about 7 minutes on an idle 2-core CPU), saves a Hugging Face folder and checks the
result through seekserve's own engine.

    python scripts/train_default_model.py            # -> src/seekserve/engine/default_model/
    python scripts/train_default_model.py --steps 50 --out /tmp/m --no-card   # a quick trial run

Data (fixed seed): "What is A + B?" / "What is A - B?" with A, B in 0..99 (A >= B for subtraction),
in a few phrasings, sometimes after a system prompt, plus a handful of fixed conversational pairs.
200 (A, B, op) triples are held out: they never appear in training, in any phrasing. At the end the
script renders those 200 questions with the chat template, decodes them greedily with `LLMEngine`,
prints the accuracy (answer text exactly the number, generation stopped by EOS) and writes them to
`heldout.json` next to the weights, for tests/engine/test_default_model.py.

Training: next-token loss on the assistant answer and its `<｜end▁of▁sentence｜>` only (the prompt is
masked), AdamW, linear warm-up then cosine decay, length-bucketed batches, float32.

Reproducibility: every random choice comes from SEED (random.Random for the data, torch.manual_seed
for the weights and batch order), and training runs on a fixed number of CPU threads (2). Reruns with
the same torch/tokenizers versions give the same tokenizer and, in practice, the same weights
(CPU float32 training with a fixed thread count is deterministic); other versions may give slightly
different weights but the same recipe and accuracy.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

SEED = 1234
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "src" / "seekserve" / "engine" / "default_model"

# DeepSeek's special tokens (fullwidth bars U+FF5C, U+2581 "lower one eighth block" for spaces).
BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
TOOL_OUTPUT = "<｜tool▁output｜>"
SPECIALS = [BOS, EOS, PAD, USER, ASSISTANT, TOOL_OUTPUT]  # ids 0..5
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# DeepSeek-V3's template, simplified: BOS, the system prompt(s), then the turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>"
    "{% if message['content'] is not none %}{{ message['content'] }}{% endif %}<｜end▁of▁sentence｜>"
    "{% elif message['role'] == 'tool' %}<｜tool▁output｜>{{ message['content'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)

ADD_PHRASINGS = ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "What's {a} plus {b}?",
                 "Calculate {a} + {b}.", "What is {a} plus {b}?", "{a} + {b}"]
SUB_PHRASINGS = ["What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?", "What's {a} minus {b}?",
                 "Calculate {a} - {b}.", "What is {a} minus {b}?", "{a} - {b}"]
HELDOUT_PHRASING = {"+": "What is {a} + {b}?", "-": "What is {a} - {b}?"}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a calculator. Answer with the number only.",
                  "Answer briefly."]
GREETING = "Hello! I am seekserve's tiny demo model. Ask me to add or subtract two numbers."
CONVERSATIONS = [
    ("Hello", GREETING), ("Hello!", GREETING), ("Hi", GREETING), ("Hi!", GREETING), ("Hey", GREETING),
    ("Who are you?", "I am seekserve's tiny demo model. Ask me to add or subtract two numbers."),
    ("What can you do?", "I can add or subtract two numbers from 0 to 99, for example: What is 37 + 45?"),
    ("Help", "Ask me to add or subtract two numbers from 0 to 99, for example: What is 37 + 45?"),
    ("Thanks", "You're welcome!"), ("Thank you!", "You're welcome!"), ("Bye", "Goodbye!"),
]

MODEL_CONFIG = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 8, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
VOCAB_SIZE = 512
NUM_HELDOUT = 200
POOL_SIZE = 400_000


# -- data -------------------------------------------------------------------------------------
def all_problems() -> list[tuple[int, int, str]]:
    return ([(a, b, "+") for a in range(100) for b in range(100)]
            + [(a, b, "-") for a in range(100) for b in range(a + 1)])


def answer(a: int, b: int, op: str) -> str:
    return str(a + b if op == "+" else a - b)


def split_problems(rng: random.Random) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """Half the held-out triples are additions, half subtractions; the rest is for training."""
    problems = all_problems()
    adds = [p for p in problems if p[2] == "+"]
    subs = [p for p in problems if p[2] == "-"]
    held = rng.sample(adds, NUM_HELDOUT // 2) + rng.sample(subs, NUM_HELDOUT - NUM_HELDOUT // 2)
    held_set = set(held)
    return [p for p in problems if p not in held_set], held


def sample_conversation(rng: random.Random, train: list[tuple[int, int, str]]) -> tuple[list[dict], str]:
    """One training example: chat messages (system?, user) and the assistant's reply."""
    messages = []
    if rng.random() < 0.1:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.02:
        question, reply = rng.choice(CONVERSATIONS)
    else:
        a, b, op = rng.choice(train)
        question = rng.choice(ADD_PHRASINGS if op == "+" else SUB_PHRASINGS).format(a=a, b=b)
        reply = answer(a, b, op)
    messages.append({"role": "user", "content": question})
    return messages, reply


@functools.cache
def _template():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)


def render_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat template, rendered the way seekserve and transformers render it."""
    return _template().render(messages=messages, add_generation_prompt=add_generation_prompt,
                              bos_token=BOS, eos_token=EOS)


def tokenizer_corpus(rng: random.Random, train: list[tuple[int, int, str]]) -> list[str]:
    texts = []
    for _ in range(5000):
        messages, reply = sample_conversation(rng, train)
        texts.append(render_template(messages) + reply + EOS)
    for question, reply in CONVERSATIONS:  # make sure the canned replies get merges
        texts.extend([f"{question} {reply}"] * 20)
    return texts


# -- tokenizer --------------------------------------------------------------------------------
def train_tokenizer(corpus: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, s
    return tok


def save_tokenizer(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    special_map = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")


def encode_examples(tok, examples: list[tuple[list[dict], str]]) -> list[tuple[list[int], int]]:
    """(token ids of prompt + reply + EOS, number of prompt tokens). The prompt ends with the special
    token <｜Assistant｜>, so prompt and reply tokenize independently of each other."""
    prompts = tok.encode_batch([render_template(m) for m, _ in examples], add_special_tokens=False)
    replies = tok.encode_batch([r for _, r in examples], add_special_tokens=False)
    return [(p.ids + r.ids + [EOS_ID], len(p.ids)) for p, r in zip(prompts, replies)]


def make_batches(encoded: list[tuple[list[int], int]], batch_size: int, gen: torch.Generator):
    """Shuffle, sort by length within chunks of 32 batches (little padding), shuffle the batches."""
    order = torch.randperm(len(encoded), generator=gen).tolist()
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(encoded[i][0]))
        batches.extend(part[i:i + batch_size] for i in range(0, len(part), batch_size))
    batches = [b for b in batches if len(b) == batch_size]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def collate(encoded: list[tuple[list[int], int]], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and next-token targets (-100 outside the reply and its EOS)."""
    length = max(len(encoded[i][0]) for i in idx) - 1
    inputs = torch.full((len(idx), length), PAD_ID, dtype=torch.long)
    targets = torch.full((len(idx), length), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        ids, n_prompt = encoded[i]
        inputs[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        # position t predicts token t+1; the reply starts at token n_prompt
        targets[row, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])
    return inputs, targets


# -- training ---------------------------------------------------------------------------------
def train_model(tok, encoded, steps: int, batch_size: int, lr: float, warmup: int, log_every: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID, torch_dtype="float32", **MODEL_CONFIG)
    model = LlamaForCausalLM(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters, vocab {config.vocab_size}", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(SEED)
    batches: list[list[int]] = []
    t0 = time.perf_counter()
    running = 0.0
    for step in range(steps):
        if not batches:
            batches = make_batches(encoded, batch_size, gen)
        inputs, targets = collate(encoded, batches.pop())
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        hidden = model.model(input_ids=inputs).last_hidden_state
        mask = targets != -100
        logits = model.lm_head(hidden[mask])
        loss = torch.nn.functional.cross_entropy(logits, targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            n = (step % log_every) + 1
            print(f"step {step + 1}/{steps}  loss {running / n:.4f}  lr {lr_at(step):.2e}  "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
            running = 0.0
    model.eval()
    return model, n_params, time.perf_counter() - t0


def save_model(model, out: Path) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False)
    model.save_pretrained(out, safe_serialization=True)


# -- evaluation through seekserve ---------------------------------------------------------------
def evaluate(out: Path, heldout: list[dict]) -> tuple[float, list[tuple[str, str, str, str | None]]]:
    from seekserve.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model_path=str(out), dtype="float32", device="cpu", kv_cache_memory_gb=0.2))
    tok = engine.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": h["question"]}]),
                          add_special_tokens=False) for h in heldout]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    wrong = [(h["question"], h["answer"], o.text, o.finish_reason) for h, o in zip(heldout, outs)
             if not (o.text.strip() == h["answer"] and o.finish_reason == "stop")]
    for q, _ in CONVERSATIONS[:3]:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": q}]), add_special_tokens=False)
        [o] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=64))
        print(f"  {q!r} -> {o.text!r} ({o.finish_reason})")
    return 1 - len(wrong) / len(heldout), wrong


def folder_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def write_card(out: Path, n_params: int, vocab: int, steps: int, batch_size: int, lr: float,
               accuracy: float) -> None:
    c = MODEL_CONFIG
    card = f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, demo, arithmetic, seekserve]
---

# seekserve default demo model

A tiny (~{n_params / 1e6:.1f}M parameters, float32) `LlamaForCausalLM` shipped with seekserve so that the
engine, the API server and their tests have a real, offline model whose answers can be checked. It
adds and subtracts two numbers from 0 to 99 and knows a few canned replies ("Hello", "Who are you?");
it knows nothing else.

    from seekserve.engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(EngineConfig(model_path="src/seekserve/engine/default_model", dtype="float32", device="cpu"))
    tok = engine.tokenizer
    ids = tok.encode(tok.apply_chat_template([{{"role": "user", "content": "What is 37 + 45?"}}]),
                     add_special_tokens=False)
    print(engine.generate([ids], SamplingParams(temperature=0, max_tokens=8))[0].text)   # 82

## Model

- Llama architecture: hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']} heads,
  MLP {c['intermediate_size']}, RoPE theta {c['rope_theta']:g}, untied embeddings, context {c['max_position_embeddings']}.
- Tokenizer: byte-level BPE (vocabulary {vocab}) trained with `tokenizers` on the generated data;
  digits are split one per token. DeepSeek-style special tokens `<｜begin▁of▁sentence｜>` (BOS),
  `<｜end▁of▁sentence｜>` (EOS), `<｜User｜>`, `<｜Assistant｜>`, `<｜tool▁output｜>`, and a simplified
  DeepSeek-V3 chat template: `BOS system <｜User｜>question<｜Assistant｜>answer<｜end▁of▁sentence｜>`.

## Training

From scratch on synthetic data generated by the script with a fixed seed: questions "What is A + B?"
and "What is A - B?" (A, B in 0..99, A >= B for subtraction) in seven phrasings each ("Compute 37 + 45.",
"37 + 45 = ?", "What's 37 plus 45?", ...), 10% of them after a system prompt, plus a few conversational
pairs. Loss only on the answer and its EOS; AdamW (lr {lr:g}, weight decay 0.1), warm-up then cosine
decay, {steps} steps of {batch_size} sequences, on 2 CPU threads (about 7 minutes on an idle 2-core CPU).

{NUM_HELDOUT} (A, B, op) triples never seen in training are in `heldout.json`. Greedy decoding through
seekserve's `LLMEngine` answers {accuracy:.1%} of them with exactly the number followed by EOS
(tests/engine/test_default_model.py checks >= 95%).

## Regenerate

    python scripts/train_default_model.py

Reruns with the same torch version give the same weights (CPU training, fixed seed, fixed threads).

## Licence

Apache-2.0. Weights, tokenizer and data are produced by the script; nothing third-party is included.
"""
    (out / "README.md").write_text(card)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=250)
    ap.add_argument("--no-card", action="store_true", help="skip README.md (trial runs)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    rng = random.Random(SEED)
    train, held = split_problems(rng)
    heldout = [{"question": HELDOUT_PHRASING[op].format(a=a, b=b), "answer": answer(a, b, op)}
               for a, b, op in held]
    tok = train_tokenizer(tokenizer_corpus(rng, train))

    # a fixed pool covering every training triple many times; training cycles through it, reshuffled
    examples = [sample_conversation(rng, train) for _ in range(min(args.steps * args.batch_size, POOL_SIZE))]
    encoded = encode_examples(tok, examples)
    lengths = sorted(len(e[0]) for e in encoded)
    print(f"data: {len(train)} training triples, {len(held)} held out, {len(encoded)} examples, "
          f"vocab {tok.get_vocab_size()}, length median {lengths[len(lengths) // 2]} max {lengths[-1]}",
          flush=True)

    model, n_params, train_s = train_model(tok, encoded, args.steps, args.batch_size, args.lr, args.warmup,
                                           args.log_every)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "pytorch_model.bin"):
        (out / stale).unlink(missing_ok=True)
    save_tokenizer(tok, out)
    save_model(model, out)
    (out / "heldout.json").write_text(json.dumps(heldout, indent=1) + "\n")

    accuracy, wrong = evaluate(out, heldout)
    for q, want, got, why in wrong[:20]:
        print(f"  wrong: {q!r} want {want!r} got {got!r} ({why})")
    if not args.no_card:
        write_card(out, n_params, tok.get_vocab_size(), args.steps, args.batch_size, args.lr, accuracy)
    size = folder_bytes(out)
    print(f"held-out accuracy through LLMEngine: {accuracy:.1%} ({len(wrong)} wrong of {len(heldout)})")
    print(f"training {train_s / 60:.1f} min, total {(time.perf_counter() - t_start) / 60:.1f} min; "
          f"{out} is {size / 2**20:.2f} MiB")
    return 0 if accuracy >= 0.95 else 1


if __name__ == "__main__":
    sys.exit(main())
