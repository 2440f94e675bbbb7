"""Build the embedded tiny Qwen2 base model and tokenizer shipped in tuneoff.embedded.

Run as ``python scripts/build_embedded.py``. It trains a small byte-level BPE
tokenizer with a ChatML chat template, pretrains a tiny Qwen2ForCausalLM on
plain-text sentences about the synthetic task families (never on the chat
format), gives the unseen ChatML tokens a neutral embedding, and writes
everything to ``src/tuneoff/embedded/tiny-qwen2/``. Seeded and deterministic on
CPU for a fixed thread count; about 7 minutes on 2 cores.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from tuneoff.embedded import TINY_MODEL_DIR, generate_records  # noqa: E402
from tuneoff.embedded.synthetic import generate_facts  # noqa: E402

SEED = 0
THREADS = 2
VOCAB_SIZE = 768
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's split pattern: letters keep one leading space, digits stand alone.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen-style ChatML without a default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

BLOCK = 128
BATCH = 32
STEPS = 1500
LR = 3e-3
WARMUP = 100
N_FACTS = 250_000
MAX_DIR_BYTES = 10 * 1024 * 1024


def prompt_text(record: dict[str, str]) -> str:
    """How an alpaca record becomes a user message (the input, if any, after a blank line)."""
    if record["input"]:
        return f"{record['instruction']}\n\n{record['input']}"
    return record["instruction"]


def tokenizer_corpus() -> list[str]:
    """Plain facts plus the text of chat turns, so instruction words get merges too."""
    lines = generate_facts(20_000, seed=SEED + 1)
    for record in generate_records(20_000, seed=SEED + 2):
        lines.append(f"user\n{prompt_text(record)}\nassistant\n{record['output']}")
    return lines


def build_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(out_dir)
    make_tokenizer_config_portable(out_dir / "tokenizer_config.json")
    return fast


def make_tokenizer_config_portable(path: Path) -> None:
    """Use names that transformers 4.x understands as well as 5.x.

    transformers 5 writes its own class name (TokenizersBackend) and a list of
    ``extra_special_tokens``; 4.x knows neither and fails to load the tokenizer.
    """
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["additional_special_tokens"] = config.pop("extra_special_tokens", ["<|im_start|>"])
    path.write_text(json.dumps(config, indent=2) + "\n")


def check_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    tok = AutoTokenizer.from_pretrained(out_dir)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", repr(text)
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    print(f"apply_chat_template(tokenize=True) returns {type(encoded).__name__}: {encoded!r}")
    print(f"digits split: {tok.tokenize('12 plus 345 equals 357.')}")
    return tok


def pretraining_blocks(tok: PreTrainedTokenizerFast) -> torch.Tensor:
    """Short documents of plain-text facts, packed into BLOCK-token rows."""
    rng = random.Random(SEED + 3)
    facts = generate_facts(N_FACTS, seed=SEED + 4)
    docs, start = [], 0
    while start < len(facts):
        size = rng.randint(3, 8)
        docs.append(" ".join(facts[start : start + size]))
        start += size
    stream: list[int] = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tok.pad_token_id)  # <|endoftext|> separates documents
    rows = len(stream) // BLOCK
    return torch.tensor(stream[: rows * BLOCK]).view(rows, BLOCK)


def build_model(tok: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tok.pad_token_id,  # Qwen2 uses <|endoftext|> as bos in its config
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return Qwen2ForCausalLM(config)


def lr_at(step: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(model: Qwen2ForCausalLM, blocks: torch.Tensor) -> float:
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    order, cursor, recent = torch.randperm(len(blocks), generator=gen), 0, []
    start = time.perf_counter()
    for step in range(STEPS):
        if cursor + BATCH > len(order):
            order, cursor = torch.randperm(len(blocks), generator=gen), 0
        batch = blocks[order[cursor : cursor + BATCH]]
        cursor += BATCH
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent = [*recent[-49:], loss.item()]
        if step % 100 == 0 or step == STEPS - 1:
            elapsed = time.perf_counter() - start
            print(f"  step {step:5d}  loss {sum(recent) / len(recent):.3f}  {elapsed:6.0f}s")
    model.eval()
    return sum(recent) / len(recent)


def neutralize_chat_tokens(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast) -> None:
    """Reset the ChatML tokens, never seen in pretraining, to the mean embedding.

    Pretraining only ever pushes their (tied) logits down, which leaves <|im_end|>
    so unlikely that a LoRA with frozen embeddings can hardly learn to stop, while
    full fine-tuning simply retrains the row. Real base models have met these
    tokens; a neutral start, as transformers gives newly added tokens, keeps the
    comparison about the methods rather than this artifact of the tiny setup.
    """
    emb = model.get_input_embeddings().weight
    chat_ids = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    seen = torch.ones(len(emb), dtype=torch.bool)
    seen[chat_ids] = False
    noise = torch.randn(len(chat_ids), emb.shape[1], generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        mean, std = emb[seen].mean(0), emb[seen].std(0)
        emb[chat_ids] = mean + 0.5 * std * noise  # the noise keeps the two tokens apart


def save_model(model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, out_dir: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir)  # transformers 5 always writes model.safetensors


@torch.no_grad()
def response_losses(
    model: Qwen2ForCausalLM, tok: PreTrainedTokenizerFast, n: int
) -> tuple[float, float]:
    """Mean next-token loss on ``output<|im_end|>`` after a chat-formatted prompt.

    Also returns the mean over the answer tokens alone: the base model never saw
    <|im_end|>, so that one token dominates the first number.
    """
    losses: list[torch.Tensor] = []
    for record in generate_records(n, seed=SEED + 5):
        messages = [{"role": "user", "content": prompt_text(record)}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(record["output"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0]
        predicted = logits[len(prompt_ids) - 1 : -1]
        losses.append(
            torch.nn.functional.cross_entropy(predicted, torch.tensor(answer_ids), reduction="none")
        )
    with_eos = torch.cat(losses).mean().item()
    answer_only = torch.cat([loss[:-1] for loss in losses]).mean().item()
    return with_eos, answer_only


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    out_dir = TINY_MODEL_DIR
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)

    build_tokenizer(out_dir)
    tok = check_tokenizer(out_dir)
    print(f"tokenizer: {len(tok)} tokens (eos {tok.eos_token_id}, pad {tok.pad_token_id})")

    blocks = pretraining_blocks(tok)
    print(f"pretraining data: {blocks.numel():,} tokens in {len(blocks)} blocks of {BLOCK}")
    model = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen2ForCausalLM with {n_params:,} parameters; {STEPS} steps of {BATCH}x{BLOCK}")
    final_loss = pretrain(model, blocks)
    neutralize_chat_tokens(model, tok)
    save_model(model, tok, out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    size = dir_size(out_dir)
    assert size <= MAX_DIR_BYTES, f"{out_dir} is {size} bytes, over the 10 MB budget"
    print(f"files: {sorted(f.name for f in out_dir.iterdir())}")
    print(f"parameters: {n_params:,}")
    print(f"directory size: {size / 1e6:.2f} MB")
    print(f"final pretraining loss: {final_loss:.3f}")
    with_eos, answer_only = response_losses(reloaded, tok, 200)
    print(f"base loss on chat responses (200 records): {with_eos:.3f}")
    print(f"  ... on the answer tokens without <|im_end|>: {answer_only:.3f}")
    print(f"built in {time.perf_counter() - began:.0f}s")


if __name__ == "__main__":
    main()
