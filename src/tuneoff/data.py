"""Data: load records, split them once for every arm, and tokenize them with prompt masking.

Records are dicts in one of `SCHEMAS`: alpaca (instruction, input, output), dolly (instruction,
context, response), prompt/completion pairs, or conversations (`messages` of role/content, or
ShareGPT's `conversations` of from/value), whose every assistant turn is supervised. The split
is made on raw records with a seeded permutation and written to `splits/` with a content hash,
so every arm of a comparison reads the very same examples. Labels are built here, never by a
collator: prompt tokens are -100 (unless `train_on_prompt`), each response ends with EOS and EOS
is supervised even when the pad token equals EOS. `inspect_examples` shows a run's split
tokenized so (`tuneoff inspect`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneoff.config import SPLIT_KEYS, Config

log = logging.getLogger(__name__)

IGNORE = -100
EMBEDDED_DATASET = "embedded:synthetic"
EMBEDDED_DATASET_SIZE = 5000
SPLITS = ("train", "val", "test")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


class DataError(ValueError):
    """A user-caused data problem; the CLI prints it as one line."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


# --------------------------------------------------------------------------- loading records


def load_records(source: str, split: str = "train", config_name: str | None = None) -> list[dict]:
    """Records from the embedded generator, a local file, or a hub dataset id."""
    if source == EMBEDDED_DATASET:
        from tuneoff.embedded import generate_records

        return generate_records(EMBEDDED_DATASET_SIZE, seed=0)
    if not source.strip():
        raise DataError(
            "--dataset is empty: pass a hub id or a local .json/.jsonl/.csv/.parquet file"
        )
    path = Path(source).expanduser()
    if path.is_file() or path.suffix.lower() in (".json", ".jsonl", ".csv", ".parquet"):
        records = _load_file(path)
    else:  # a hub id, or a local dataset directory (a clone of a hub repository)
        records = _load_hub(source, split, config_name)
    if not records:
        raise DataError(f"dataset {source}: no records found; check the file or --dataset")
    check_schema(records, source)
    return records


def _load_file(path: Path) -> list[dict]:
    if not path.exists():
        raise DataError(
            f"dataset file {path} not found: pass an existing .json/.jsonl/.csv/.parquet file"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                return [dict(row) for row in csv.DictReader(fh)]
        if suffix == ".parquet":
            return _read_parquet(path)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"dataset file {path}: cannot be read ({err})") from None
    raise DataError(
        f"dataset file {path}: unsupported type {suffix}; use .json, .jsonl, .csv, .parquet"
    )


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pyarrow.ArrowException as err:
        raise DataError(f"dataset file {path}: not a readable parquet file ({err})") from None


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as fh:  # -sig: a BOM (Windows tools write one) goes
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"dataset file {path} line {lineno}: malformed JSON ({err.msg}); fix the line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"dataset file {path} line {lineno}: expected a JSON object")
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines saved as .json
            return _read_jsonl(path)
        raise DataError(
            f"dataset file {path} line {err.lineno}: malformed JSON ({err.msg}); fix it"
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"dataset file {path}: expected a JSON list of objects")
    return data


def _load_hub(source: str, split: str, config_name: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, config_name, split=split)
    # IndexError: a local directory with no data files datasets can read (e.g. `/`)
    except (FileNotFoundError, ConnectionError, OSError, ValueError, IndexError) as err:
        first = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise DataError(
            f"dataset {source!r} could not be loaded from the hub or found locally ({first}); "
            "offline, download it elsewhere and pass the file: --dataset ./data.json"
        ) from None
    return [dict(r) for r in ds]


# Record schemas, tried in this order: the text columns each needs (optional ones apart).
SCHEMAS = {
    "alpaca": ("instruction", "output"),  # + input
    "dolly": ("instruction", "response"),  # + context (databricks-dolly-15k)
    "prompt": ("prompt", "completion"),
    "messages": ("messages",),  # [{"role", "content"}]: TRL's and OpenAI's chat format
    "sharegpt": ("conversations",),  # [{"from", "value"}]
}
CHAT_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
ROLES.update({"human": "user", "gpt": "assistant"})  # ShareGPT's names


def check_schema(records: list[dict], source: str) -> str:
    """The records' schema (a key of `SCHEMAS`), or a DataError naming the gap."""
    first = records[0]
    kind = next((k for k, cols in SCHEMAS.items() if all(c in first for c in cols)), None)
    if kind is None:
        raise DataError(
            f"dataset {source}: record 1 has columns {sorted(first)}; expected instruction/input/"
            "output (alpaca), instruction/context/response (dolly), prompt/completion, messages "
            "or conversations; rename the columns"
        )
    for i, record in enumerate(records, 1):
        if kind in CHAT_KEYS:
            problem = _conversation_problem(record.get(SCHEMAS[kind][0]), *CHAT_KEYS[kind])
            if problem:
                raise DataError(f"dataset {source}: record {i}: {problem}; fix or remove it")
            continue
        for key in SCHEMAS[kind]:
            value = record.get(key)
            if not isinstance(value, str):
                what = f"{type(value).__name__} {str(value)[:40]!r}, not text,"
                what = "no text" if value is None else what
                raise DataError(
                    f"dataset {source}: record {i} has {what} in column {key!r}; fix or remove it"
                )
    return kind


def _conversation_problem(turns: Any, role_key: str, text_key: str) -> str | None:
    if not isinstance(turns, list) or not turns:
        return "its conversation is not a non-empty list of turns"
    for n, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            return f"turn {n} has no text in {text_key!r}"
        if turn.get(role_key) not in ROLES:
            return f"turn {n} has {role_key} {turn.get(role_key)!r}, not one of {', '.join(ROLES)}"
    if not any(ROLES[t[role_key]] == "assistant" for t in turns):
        return "its conversation has no assistant turn to learn"
    return None


def conversation(record: dict) -> list[dict[str, str]] | None:
    """A conversational record's turns as [{"role", "content"}] up to its last assistant turn
    (later turns teach nothing); None for the other schemas."""
    for kind, (role_key, text_key) in CHAT_KEYS.items():
        turns = record.get(SCHEMAS[kind][0])
        if isinstance(turns, list):
            chat = [{"role": ROLES[t[role_key]], "content": t[text_key]} for t in turns]
            last = max(i for i, t in enumerate(chat) if t["role"] == "assistant")
            return chat[: last + 1]
    return None


# --------------------------------------------------------------------------- splits


def split_records(records: list[dict], cfg: Config) -> dict[str, list[dict]]:
    """Deterministic, disjoint train/val/test split by a seeded permutation of the records."""
    if cfg.limit is not None:
        records = records[: cfg.limit]
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    n_test = round(len(records) * cfg.test_fraction)
    n_val = round(len(records) * cfg.val_fraction)
    if (cfg.test_fraction and not n_test) or (cfg.val_fraction and not n_val):
        raise DataError(
            f"dataset has {len(records)} records: too few for val_fraction={cfg.val_fraction} "
            f"and test_fraction={cfg.test_fraction}; use more records or larger fractions"
        )
    test, val, train = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return {
        name: [records[i] for i in sorted(idx)] for name, idx in zip(SPLITS, (train, val, test))
    }


def split_identity(cfg: Config) -> dict[str, Any]:
    """What determines the split: two runs with equal identities share one `splits/`."""
    return {k: getattr(cfg, k) for k in SPLIT_KEYS}


def write_splits(splits: dict[str, list[dict]], directory: Path, cfg: Config) -> dict[str, Any]:
    directory.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"identity": split_identity(cfg), "files": {}}
    for name, records in splits.items():
        path = directory / f"{name}.jsonl"
        body = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
        path.write_text(body, encoding="utf-8")
        digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
        manifest["files"][name] = {"records": len(records), "sha256": digest}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_splits(directory: Path) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Read `splits/` back, verifying each file against the hash in its manifest."""
    manifest = json.loads((directory / "manifest.json").read_text())
    splits = {}
    for name, info in manifest["files"].items():
        body = (directory / f"{name}.jsonl").read_bytes()
        if hashlib.sha256(body).hexdigest() != info["sha256"]:
            raise DataError(
                f"{directory / name}.jsonl does not match its hash in manifest.json (edited "
                "since the run began?): restore it, or start a new run with another --output-dir"
            )
        splits[name] = [json.loads(line) for line in body.decode("utf-8").splitlines()]
    return splits, manifest


def check_splits(cfg: Config, directory: Path) -> dict | None:
    """The manifest of `splits/` if it exists (None if not); it must come from the same data
    settings."""
    if not (directory / "manifest.json").is_file():
        return None
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest["identity"] != split_identity(cfg):
        raise DataError(
            f"{directory} was made with other data settings ({manifest['identity']}); "
            "use another --output-dir or the same dataset/seed/fractions"
        )
    return manifest


def prepare_splits(cfg: Config, directory: Path, records: list[dict] | None = None) -> dict:
    """Write `splits/` unless it exists; if it exists, it must come from the same data settings.
    `records` (already loaded) saves loading the dataset twice."""
    manifest = check_splits(cfg, directory)
    if manifest is not None:
        return manifest
    if records is None:
        records = load_records(cfg.dataset, cfg.dataset_split, cfg.dataset_config)
    return write_splits(split_records(records, cfg), directory, cfg)


# --------------------------------------------------------------------------- tokenization


def _extra(record: dict) -> str:
    """An alpaca record's input, or a dolly record's context."""
    return (record.get("input") or record.get("context") or "").strip()


def user_message(record: dict) -> str:
    if "instruction" in record:
        extra = _extra(record)
        return record["instruction"].strip() + (f"\n\n{extra}" if extra else "")
    return record["prompt"]


def response_text(record: dict) -> str:
    """The text to learn: of a conversation, its last assistant turn (what generation is scored
    against; training learns every assistant turn)."""
    chat = conversation(record)
    if chat is not None:
        return chat[-1]["content"]
    for key in ("output", "response", "completion"):
        if key in record:
            return record[key]
    raise DataError(f"record with columns {sorted(record)} has no response")


def _chat_template(tokenizer: Any, turns: list[dict], **kwargs: Any) -> str:
    from jinja2 import TemplateError  # what a template's own raise_exception raises

    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)
    except TemplateError as err:  # e.g. "System role not supported"
        roles = "/".join(dict.fromkeys(t["role"] for t in turns))
        raise DataError(
            f"the model's chat template refuses a conversation of {roles} turns ({err}); "
            "drop or merge those turns (e.g. the system turn into the first user turn)"
        ) from None


def prompt_text(record: dict, tokenizer: Any) -> str:
    """The chat template when the tokenizer has one, else the Alpaca template. Of a
    conversation: every turn before its last assistant turn, in the chat template."""
    chat = conversation(record)
    if chat is not None:
        _need_chat_template(tokenizer)
        return _chat_template(tokenizer, chat[:-1], add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": user_message(record)}]
        return _chat_template(tokenizer, messages, add_generation_prompt=True)
    if "instruction" not in record:
        return record["prompt"]
    extra = _extra(record)
    return ALPACA_PROMPT.format(
        with_input=", paired with an input that provides further context" if extra else "",
        instruction=record["instruction"].strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "",
    )


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token in its config")
    return tokenizer.eos_token_id


def prompt_ids(record: dict, tokenizer: Any) -> list[int]:
    return tokenizer(prompt_text(record, tokenizer), add_special_tokens=False)["input_ids"]


def _need_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the dataset is conversational but the model's tokenizer has no chat template; "
            "use a chat model (e.g. an -Instruct one) or a dataset of instruction/output pairs"
        )


def tokenize(record: dict, tokenizer: Any, cfg: Config) -> Example | None:
    """Prompt + response + EOS, cut at `max_seq_len` from the end of the response.
    Returns None when the prompt leaves no room for a single response token."""
    chat = conversation(record)
    if chat is not None:
        return tokenize_conversation(chat, tokenizer, cfg)
    prompt = prompt_ids(record, tokenizer)
    response = tokenizer(response_text(record), add_special_tokens=False)["input_ids"]
    response = response + [eos_id(tokenizer)]
    room = cfg.max_seq_len - len(prompt)
    if room < 1:
        return None
    truncated = len(response) > room
    response = response[:room]
    prompt_labels = list(prompt) if cfg.train_on_prompt else [IGNORE] * len(prompt)
    return Example(prompt + response, prompt_labels + response, truncated)


def tokenize_conversation(chat: list[dict], tokenizer: Any, cfg: Config) -> Example | None:
    """Every assistant turn supervised (its text + EOS), everything the chat template puts
    around and between them (system, user turns, role headers) masked unless
    `train_on_prompt`; cut at `max_seq_len` from the end. Each assistant turn's prompt is the
    template's rendering of the turns before it, so the template must render a conversation's
    start the same whatever follows (a DataError says when it does not). None when not one
    supervised token fits."""
    _need_chat_template(tokenizer)
    eos = eos_id(tokenizer)
    eos_text = tokenizer.decode([eos])
    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the template's text that `ids` covers, less the EOS after the last response
    for i, turn in enumerate(chat):
        if turn["role"] != "assistant":
            continue
        text = _chat_template(tokenizer, chat[:i], add_generation_prompt=True)
        full = _chat_template(tokenizer, chat[: i + 1])
        if not text.startswith(done) or not full.startswith(text):
            raise DataError(
                f"the chat template renders turns 1-{i} differently once turn {i + 1} follows "
                "(e.g. it rewrites earlier assistant turns); train on single-turn records instead"
            )
        piece = text[len(done) :]
        if ids and piece.startswith(eos_text):  # the template's turn end: the EOS already there
            piece = piece[len(eos_text) :]
        # The response as the template writes it (some trim it), up to its turn end when that
        # is the EOS token; else as written in the record.
        segment = full[len(text) :]
        end = segment.find(eos_text) if eos_text else -1
        content = segment[:end] if end >= 0 else turn["content"]
        prompt = tokenizer(piece, add_special_tokens=False)["input_ids"]
        response = tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]
        ids += prompt + response
        labels += (list(prompt) if cfg.train_on_prompt else [IGNORE] * len(prompt)) + response
        done = text + content
    truncated = len(ids) > cfg.max_seq_len
    ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
    if all(label == IGNORE for label in labels[1:]):
        return None
    return Example(ids, labels, truncated)


def tokenize_split(
    records: list[dict], tokenizer: Any, cfg: Config
) -> tuple[list[Example], dict[str, int]]:
    examples, dropped = [], 0
    for i, record in enumerate(records, 1):
        try:
            example = tokenize(record, tokenizer, cfg)
        except DataError as err:
            raise DataError(f"record {i} of the split: {err}") from None
        if example is None:
            dropped += 1
        else:
            examples.append(example)
    counts = {
        "examples": len(examples),
        "truncated": sum(e.truncated for e in examples),
        "dropped": dropped,
    }
    return examples, counts


# --------------------------------------------------------------------------- inspect


def inspect_examples(path: Path, split: str, limit: int, as_json: bool = False) -> str:
    """Tokenize a run's split exactly as training does; [bracketed] tokens count toward the loss."""
    from tuneoff.model import load_tokenizer
    from tuneoff.runs import load_run_config

    run_dir, cfg = load_run_config(path)
    tokenizer = load_tokenizer(cfg.model)
    records = read_splits(run_dir / "splits")[0][split][:limit]
    out, rows = [], []
    for i, record in enumerate(records):
        example = tokenize(record, tokenizer, cfg)
        if example is None:
            out.append(f"--- {split}[{i}]: dropped (the prompt leaves no room for a response)")
            rows.append({"index": i, "dropped": True})
            continue
        rows.append(
            {
                "index": i,
                "input_ids": example.input_ids,
                "labels": example.labels,
                "truncated": example.truncated,
            }
        )
        shown = []
        # The first token is never predicted (nothing precedes it), even with train_on_prompt.
        for pos, (tok, lab) in enumerate(zip(example.input_ids, example.labels)):
            text = tokenizer.decode([tok]).replace("\n", "\\n")
            shown.append(f"[{text}]" if lab != IGNORE and pos else text)
        n_sup = sum(lab != IGNORE for lab in example.labels[1:])
        out.append(
            f"--- {split}[{i}]: {len(example.input_ids)} tokens, {n_sup} supervised "
            f"(in [brackets]), truncated: {'yes' if example.truncated else 'no'}"
        )
        out.append("|".join(shown))
    return json.dumps(rows) if as_json else "\n".join(out)
