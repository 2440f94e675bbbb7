"""Tests for the embedded default: synthetic task generator and the shipped tiny Qwen2 model."""

from __future__ import annotations

import functools
import json
import random
import re
from collections import Counter

import pytest

from tuneoff.embedded import TASK_FAMILIES, TINY_MODEL_DIR, check_answer, generate_records


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _text(record: dict[str, str]) -> str:
    return f"{record['instruction']} {record['input']}"


@functools.cache
def _template_words(name: str) -> frozenset[str]:
    """Words of a family's fixed phrasings: those recurring across many of its records."""
    rng = random.Random(99)
    counts = Counter(
        word
        for _ in range(400)
        for word in set(re.findall(r"[a-z]+", TASK_FAMILIES[name](rng).instruction.lower()))
    )
    return frozenset(word for word, count in counts.items() if count >= 20)


def _subject_word(name: str, record: dict[str, str]) -> str:
    """The word a word task is about: its input, or the one non-template word."""
    if record["input"]:
        return record["input"]
    words = re.findall(r"[a-z]+", record["instruction"].lower())
    candidates = [word for word in words if word not in _template_words(name)]
    assert len(candidates) == 1, record
    return candidates[0]


def _expected(name: str, record: dict[str, str]) -> str:
    """Recompute the answer from the record's text alone."""
    text = _text(record)
    nums = _ints(text)
    if name == "addition":
        return str(nums[0] + nums[1])
    if name == "subtraction":  # always the larger minus the smaller, whatever the phrasing
        return str(max(nums) - min(nums))
    if name == "sort_numbers":
        return " ".join(map(str, sorted(nums)))
    if name in ("maximum", "larger_of_two"):
        return str(max(nums))
    if name == "minimum":
        return str(min(nums))
    if name == "parity":
        return "odd" if nums[0] % 2 else "even"
    if name == "convert_units":
        factors = {"km": 1000, "kg": 1000, "meters": 100, "hours": 60, "minutes": 60}
        unit = re.search(r"\d+ (\w+)", text).group(1)
        return str(nums[0] * factors[unit])
    if name == "count_items":
        listed = record["input"] or text.split(": ")[-1].strip().rstrip("?")
        return str(len(listed.split(", ")))
    if name == "repeat_word":
        return " ".join([_subject_word(name, record)] * nums[0])
    word = _subject_word(name, record)
    if name == "reverse_word":
        return word[::-1]
    if name == "uppercase_word":
        return word.upper()
    if name == "count_letters":
        return str(len(word))
    if name == "edge_letter":
        first = "first" in text or "start" in text
        return word[0] if first else word[-1]
    raise AssertionError(f"no independent check for family {name}")


def test_generator_is_deterministic() -> None:
    assert generate_records(200, seed=7) == generate_records(200, seed=7)
    assert generate_records(200, seed=7) != generate_records(200, seed=8)
    assert generate_records(50) == generate_records(50, seed=0)


def test_generator_does_not_touch_global_random() -> None:
    random.seed(1)
    expected = random.random()
    random.seed(1)
    generate_records(20, seed=3)
    assert random.random() == expected


def test_records_have_alpaca_schema() -> None:
    records = generate_records(300, seed=1)
    assert len(records) == 300
    for record in records:
        assert set(record) == {"instruction", "input", "output"}
        assert all(isinstance(value, str) for value in record.values())
        assert record["instruction"] and record["output"]


def test_at_least_ten_families() -> None:
    assert len(TASK_FAMILIES) >= 10


@pytest.mark.parametrize("name", sorted(TASK_FAMILIES))
def test_family_uses_varied_phrasings(name: str) -> None:
    rng = random.Random(2)
    openings = {" ".join(TASK_FAMILIES[name](rng).instruction.split()[:2]) for _ in range(100)}
    assert len(openings) >= 3


@pytest.mark.parametrize("name", sorted(TASK_FAMILIES))
def test_family_answers_match_independent_computation(name: str) -> None:
    rng = random.Random(name)
    for _ in range(25):
        record = TASK_FAMILIES[name](rng).record()
        assert record["output"] == _expected(name, record), record


@pytest.mark.parametrize("name", sorted(TASK_FAMILIES))
def test_family_fact_states_the_answer(name: str) -> None:
    example = TASK_FAMILIES[name](random.Random(1))
    assert example.output in example.fact


def test_records_are_mostly_distinct() -> None:
    records = generate_records(4000, seed=0)
    keys = {tuple(r.values()) for r in records}
    assert len(keys) / len(records) > 0.97


def test_check_answer() -> None:
    record = {"instruction": "What is 2 + 3?", "input": "", "output": "5"}
    assert check_answer(record, "5")
    assert check_answer(record, "  5\n")
    assert not check_answer(record, "6")
    assert not check_answer(record, "5 apples")
    assert not check_answer(record, "")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def test_shipped_tokenizer(tokenizer) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert 512 <= len(tokenizer) <= 1024
    assert tokenizer.tokenize("123") == ["1", "2", "3"]  # digits split one by one
    record = generate_records(1, seed=0)[0]
    ids = tokenizer(record["instruction"] + record["output"])["input_ids"]
    assert tokenizer.decode(ids) == record["instruction"] + record["output"]


def test_shipped_tokenizer_config_is_portable() -> None:
    # transformers 4.x cannot load the class name transformers 5 writes by default.
    config = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["additional_special_tokens"] == ["<|im_start|>"]


def test_shipped_chat_template_is_chatml(tokenizer) -> None:
    assert tokenizer.chat_template
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_shipped_model_loads() -> None:
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.config.model_type == "qwen2"
    assert model.config.tie_word_embeddings
    assert model.generation_config.eos_token_id == model.config.eos_token_id
    assert model.config.eos_token_id != model.config.pad_token_id


def test_shipped_model_directory_is_small() -> None:
    names = {path.name for path in TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    size = sum(path.stat().st_size for path in TINY_MODEL_DIR.rglob("*") if path.is_file())
    assert size <= 10 * 1024 * 1024
