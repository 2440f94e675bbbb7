"""Data: loading and its errors, record schemas (conversations included), deterministic
disjoint splits, prompt masking, EOS, batching."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from tuneoff.batching import collate, epoch_batches
from tuneoff.config import Config
from tuneoff.data import (
    IGNORE,
    DataError,
    load_records,
    prepare_splits,
    prompt_text,
    read_splits,
    response_text,
    split_records,
    tokenize,
    tokenize_split,
    write_splits,
)
from tuneoff.embedded import TINY_MODEL_DIR
from tuneoff.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(TINY_MODEL_DIR))


def records(n: int) -> list[dict]:
    return [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


# --------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_complete():
    cfg = Config(val_fraction=0.1, test_fraction=0.1, seed=3)
    a, b = split_records(records(200), cfg), split_records(records(200), cfg)
    assert a == b
    ids = {name: {r["instruction"] for r in rows} for name, rows in a.items()}
    assert len(ids["val"]) == len(ids["test"]) == 20 and len(ids["train"]) == 160
    assert not (ids["val"] & ids["test"]) and not (ids["train"] & (ids["val"] | ids["test"]))
    other = split_records(records(200), Config(val_fraction=0.1, test_fraction=0.1, seed=4))
    assert other["test"] != a["test"]


def test_splits_roundtrip_with_hash_and_detect_tampering(tmp_path):
    cfg = Config(val_fraction=0.1, test_fraction=0.1)
    manifest = write_splits(split_records(records(50), cfg), tmp_path, cfg)
    back, _ = read_splits(tmp_path)
    assert back == split_records(records(50), cfg)
    assert len(manifest["files"]["test"]["sha256"]) == 64
    (tmp_path / "test.jsonl").write_text('{"instruction": "x", "input": "", "output": "y"}\n')
    with pytest.raises(DataError, match="does not match its hash"):
        read_splits(tmp_path)


def test_existing_splits_from_other_settings_are_refused(tmp_path, alpaca_file):
    prepare_splits(Config(dataset=str(alpaca_file), seed=1), tmp_path)
    prepare_splits(Config(dataset=str(alpaca_file), seed=1, lr=1.0), tmp_path)  # same data: ok
    with pytest.raises(DataError, match="other data settings"):
        prepare_splits(Config(dataset=str(alpaca_file), seed=2), tmp_path)


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_batches(10, 4, seed=1, epoch=0) == epoch_batches(10, 4, seed=1, epoch=0)
    assert epoch_batches(10, 4, seed=1, epoch=0) != epoch_batches(10, 4, seed=1, epoch=1)
    assert [len(b) for b in epoch_batches(10, 4, seed=1, epoch=0)] == [4, 4, 2]  # last kept


# --------------------------------------------------------------------------- tokenization


def test_prompt_is_masked_and_eos_is_supervised(tokenizer):
    record = {"instruction": "Reverse the word.", "input": "stone", "output": "enots"}
    example = tokenize(record, tokenizer, Config(max_seq_len=128))
    prompt = tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]
    response = tokenizer("enots", add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt + response + [tokenizer.eos_token_id]
    assert example.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert example.labels[len(prompt) :] == response + [tokenizer.eos_token_id]
    assert "<|im_start|>assistant" in prompt_text(record, tokenizer)  # the chat template


def test_eos_stays_supervised_when_pad_equals_eos(tokenizer):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tok.pad_token = tok.eos_token  # the reference's setting: pad = EOS
    cfg = Config(max_seq_len=128)
    short = tokenize({"instruction": "a", "input": "", "output": "b"}, tok, cfg)
    long = tokenize({"instruction": "a", "input": "", "output": "b c d e f g"}, tok, cfg)
    batch = collate([short, long], tok.pad_token_id)
    row = batch["labels"][0]
    assert row[len(short.input_ids) - 1] == tok.eos_token_id  # the real EOS is learned
    assert (row[len(short.input_ids) :] == IGNORE).all()  # padding (also EOS id) is not
    assert batch["input_ids"][0, len(short.input_ids) :].eq(tok.eos_token_id).all()


def test_train_on_prompt_supervises_the_prompt(tokenizer):
    record = {"instruction": "Say hi.", "input": "", "output": "hi"}
    example = tokenize(record, tokenizer, Config(train_on_prompt=True))
    assert example.labels == example.input_ids


def test_truncation_cuts_the_response_and_drops_prompts_without_room(tokenizer):
    record = {"instruction": "Repeat.", "input": "", "output": " ".join(["word"] * 80)}
    n_prompt = len(tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"])
    cfg = Config(max_seq_len=n_prompt + 5)
    example = tokenize(record, tokenizer, cfg)
    assert len(example.input_ids) == n_prompt + 5 and example.truncated
    assert example.labels[-1] != tokenizer.eos_token_id  # the cut removed the EOS
    assert tokenize(record, tokenizer, Config(max_seq_len=n_prompt)) is None
    examples, counts = tokenize_split(
        [record, {**record, "output": "ok"}], tokenizer, Config(max_seq_len=n_prompt + 5)
    )
    assert counts == {"examples": 2, "truncated": 1, "dropped": 0}
    _, counts = tokenize_split([record], tokenizer, Config(max_seq_len=n_prompt))
    assert counts == {"examples": 0, "truncated": 0, "dropped": 1}


def test_batches_pad_to_the_longest_example_not_max_len(tokenizer):
    cfg = Config(max_seq_len=256)
    examples = [
        tokenize({"instruction": "x" * n, "input": "", "output": "y"}, tokenizer, cfg)
        for n in (1, 5, 9)
    ]
    batch = collate(examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[1] == max(len(e.input_ids) for e in examples) < 256
    assert batch["attention_mask"].sum() == sum(len(e.input_ids) for e in examples)


def test_alpaca_template_without_chat_template(tokenizer):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tok.chat_template = None
    text = prompt_text({"instruction": "Add.", "input": "2 3", "output": "5"}, tok)
    assert text.startswith("Below is an instruction") and "### Input:\n2 3" in text
    assert text.endswith("### Response:\n")


# --------------------------------------------------------------------------- loading


def test_loads_every_local_format(tmp_path):
    rows = records(5)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.csv").write_text(
        "instruction,input,output\n" + "".join(f"task {i},,answer {i}\n" for i in range(5))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    for suffix in ("json", "jsonl", "csv", "parquet"):
        loaded = load_records(str(tmp_path / f"a.{suffix}"))
        assert [r["output"] for r in loaded] == [r["output"] for r in rows], suffix


def test_prompt_completion_pairs(tmp_path, tokenizer):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "completion": "4"}) + "\n")
    (record,) = load_records(str(path))
    example = tokenize(record, tokenizer, Config())
    assert example.labels[-1] == tokenizer.eos_token_id
    assert "2+2?" in prompt_text(record, tokenizer)


def test_dolly_records_use_their_context(tokenizer):
    record = {"instruction": "Add.", "context": "2 3", "response": "5", "category": "math"}
    (loaded,) = [record]
    example = tokenize(loaded, tokenizer, Config())
    assert "Add.\n\n2 3" in prompt_text(record, tokenizer)
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tokenizer.decode(supervised) == "5" + tokenizer.eos_token


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "It is 5. "},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "8"},
    {"role": "user", "content": "Thanks"},  # after the last answer: nothing to learn
]


@pytest.mark.parametrize("schema", ["messages", "sharegpt"])
def test_conversations_supervise_every_assistant_turn(tmp_path, tokenizer, schema):
    """Each assistant turn and its EOS is learned, nothing else; the tokens are those of the
    chat template's own rendering up to the last answer's EOS."""
    if schema == "messages":
        row = {"messages": CHAT}
    else:
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        row = {"conversations": [{"from": names[t["role"]], "value": t["content"]} for t in CHAT]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (record,) = load_records(str(path))
    example = tokenize(record, tokenizer, Config())
    eos = tokenizer.eos_token
    rendered = tokenizer.apply_chat_template(CHAT[:5], tokenize=False)
    rendered = rendered[: rendered.rindex(eos) + len(eos)]
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE]
    assert tokenizer.decode(supervised) == f"It is 5. {eos}8{eos}"
    # generation is scored on the last answer, prompted with every turn before it
    assert prompt_text(record, tokenizer).endswith("And 4+4?<|im_end|>\n<|im_start|>assistant\n")
    assert response_text(record) == "8"
    on_prompt = tokenize(record, tokenizer, Config(train_on_prompt=True))
    assert on_prompt.labels == on_prompt.input_ids


def test_conversations_cut_at_max_seq_len_and_drop_without_an_answer(tokenizer):
    record = {"messages": CHAT}
    full = tokenize(record, tokenizer, Config())
    first_answer = full.labels.index(next(x for x in full.labels if x != IGNORE))
    cut = tokenize(record, tokenizer, Config(max_seq_len=first_answer + 2))
    assert cut.truncated and cut.input_ids == full.input_ids[: first_answer + 2]
    assert tokenize(record, tokenizer, Config(max_seq_len=first_answer)) is None


def test_conversations_need_a_chat_template_and_a_stable_one():
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize({"messages": CHAT}, tok, Config())
    # a template that rewrites earlier answers once more turns follow (as Qwen3's drops
    # reasoning) cannot be split into turns
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}<|im_start|>"
        "assistant\n[earlier]<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>"
        "assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="renders turns 1-4 differently"):
        tokenize({"messages": CHAT}, tok, Config())
    # a template that refuses a role (as Gemma's refuses system turns): one line, which record
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    good = {"messages": CHAT[1:]}
    assert tokenize(good, tok, Config()) is not None
    with pytest.raises(DataError, match="record 2 of the split: .*System role not supported"):
        tokenize_split([good, {"messages": CHAT}], tok, Config())


@pytest.mark.parametrize(
    "row, fragment",
    [
        ({"messages": []}, "its conversation is not a non-empty list"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "turn 1 has role 'bot'"),
        ({"conversations": [{"from": "gpt", "value": None}]}, "turn 1 has no text in 'value'"),
    ],
)
def test_bad_conversations_give_one_line_errors(tmp_path, row, fragment):
    good = {"messages": CHAT}
    if "conversations" in row:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path))
    message = str(err.value)
    assert "record 2: " in message and fragment in message and "\n" not in message


@pytest.mark.parametrize(
    "name, body, fragment",
    [
        ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": oops}\n', "line 2"),
        ("cols.jsonl", '{"question": "a", "answer": "b"}\n', "expected instruction/input/output"),
        ("empty.jsonl", "\n", "no records"),
        ("nulls.jsonl", '{"instruction": "a", "output": null}\n', "no text in column 'output'"),
        ("ints.jsonl", '{"instruction": 1, "output": "b"}\n', "has int '1', not text, in column"),
        ("list.json", '{"a": 1, "b": 2}', "expected a JSON list"),
        ("data.txt", "hello", "unsupported type"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, body, fragment):
    path = tmp_path / name
    path.write_text(body)
    with pytest.raises(DataError) as err:
        load_records(str(path))
    assert fragment in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_records(str(tmp_path / "missing.json"))


def test_hub_dataset_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="--dataset ./data.json"):
        load_records("nobody-owns-this/no-such-dataset-tuneoff")


def test_files_with_a_byte_order_mark_load(tmp_path):
    """Excel and Windows tools start UTF-8 files with a BOM: it is not part of the first column."""
    bom = "\ufeff"
    (tmp_path / "d.csv").write_text(f"{bom}instruction,input,output\nx,,y\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(bom + json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    (tmp_path / "d.json").write_text(bom + json.dumps([{"prompt": "p", "completion": "c"}]))
    assert load_records(str(tmp_path / "d.csv")) == [
        {"instruction": "x", "input": "", "output": "y"}
    ]
    for name in ("d.jsonl", "d.json"):
        assert load_records(str(tmp_path / name)) == [{"prompt": "p", "completion": "c"}]


@pytest.mark.parametrize("source", ["", "  ", "/"])
def test_an_empty_or_unreadable_dataset_path_is_one_line(source, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_records(source)
    assert "--dataset" in str(err.value) and "\n" not in str(err.value)
