"""Shared fixtures: a tiny Qwen2 model built in-process (never downloaded) and small datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch


def tiny_qwen2_config(hidden: int = 32, layers: int = 2, vocab: int = 768, **extra: Any) -> Any:
    """A Qwen2 config small enough for CPU tests (4 heads, 2 key-value heads, tied embeddings)."""
    from transformers import Qwen2Config

    defaults = dict(max_position_embeddings=512, tie_word_embeddings=True)
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        **{**defaults, **extra},
    )


def build_tiny_model(directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialized Qwen2 model with the shipped tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from tuneoff.embedded import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    config = tiny_qwen2_config(
        hidden,
        layers,
        len(tokenizer),
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    from tuneoff.embedded import generate_records

    return write_jsonl(tmp_path / "data.jsonl", generate_records(200, seed=1))


def toy_examples(lengths: list[int], vocab: int = 768, seed: int = 0) -> list:
    """Examples whose first third is prompt (labels IGNORE) and the rest supervised."""
    from tuneoff.data import IGNORE, Example

    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        cut = max(1, n // 3)
        out.append(Example(ids, [IGNORE] * cut + ids[cut:], False))
    return out
