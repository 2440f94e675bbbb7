"""Evaluation: loss, perplexity, token accuracy, bits per token, and generation exact match.

Every metric is over supervised tokens only, with the shift done right: the logits at position t
predict the label at t + 1. (The reference compared unshifted positions, which is why its token
accuracy read 0.009 at perplexity 3.6.) Forward passes are timed apart from generation.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tuneoff.batching import eval_batches
from tuneoff.data import prompt_ids, response_text
from tuneoff.loss import forward_stats
from tuneoff.measure import Stopwatch


def summarize(total_loss: float, correct: int, tokens: int) -> dict[str, float]:
    loss = total_loss / tokens if tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "token_accuracy": correct / tokens if tokens else float("nan"),
        "bits_per_token": loss / math.log(2),
    }


_WARMED: set[int] = set()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    device: str,
    chunk_size: int = 0,
) -> dict[str, float]:
    """Metrics over every batch; `tokens_per_s` counts non-padding tokens of forward passes only.
    `chunk_size` > 0: the lm head runs on supervised positions in chunks (same metrics)."""
    was_training = model.training
    model.eval()
    watch = Stopwatch(device)
    total_loss, correct, supervised, seen = 0.0, 0, 0, 0
    batches = list(batches)
    if batches and id(model) not in _WARMED:
        # One untimed pass per model and process: start-up (CUDA context and kernels, oneDNN
        # kernels, the allocator's first blocks) is not throughput, and the base arm evaluates
        # first in its process while the other arms evaluate after training.
        forward_stats(model, {k: v.to(device) for k, v in batches[0].items()}, chunk_size)
        _WARMED.add(id(model))
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with watch:
            part_loss, part_correct, part_tokens = forward_stats(model, batch, chunk_size)
        total_loss += part_loss
        correct += part_correct
        supervised += part_tokens
        seen += _real_tokens(batch)
    model.train(was_training)
    return {
        **summarize(total_loss, correct, supervised),
        "supervised_tokens": supervised,
        "tokens": seen,
        "eval_time_s": watch.total_s,
        "tokens_per_s": seen / watch.total_s if watch.total_s else float("nan"),
    }


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens of a batch (a packed batch has no attention mask and no padding)."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    records: list[dict],
    device: str,
    max_new_tokens: int,
    batch_size: int,
) -> tuple[list[str], dict[str, float]]:
    """Greedy answers to each record's prompt (left-padded batches), and generation timing."""
    was_training = model.training
    model.eval()
    watch = Stopwatch(device)
    answers, new_tokens = [], 0
    pad = tokenizer.pad_token_id
    for start in range(0, len(records), batch_size):
        prompts = [prompt_ids(r, tokenizer) for r in records[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with watch:
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            new_tokens += len(row)
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    timing = {
        "generation_time_s": watch.total_s,
        "generated_tokens": new_tokens,
        "generation_tokens_per_s": new_tokens / watch.total_s if watch.total_s else float("nan"),
    }
    return answers, timing


def exact_match(records: list[dict], answers: list[str]) -> float:
    """Share of answers equal to the reference response, whitespace stripped at both ends."""
    hits = sum(a.strip() == response_text(r).strip() for r, a in zip(records, answers))
    return hits / len(records) if records else float("nan")


def evaluate_splits(model, data: dict, cfg: Any, device: str, pad_id: int) -> dict[str, Any]:
    """Loss, perplexity, token accuracy, bits/token per split. The train split is measured on a
    fixed seeded sample as large as val (or `eval_train_examples`), to keep evaluation cheap."""
    n_train = cfg.eval_train_examples or max(len(data["val"]), 1)
    pick = sorted(
        random.Random(cfg.seed).sample(range(len(data["train"])), min(n_train, len(data["train"])))
    )
    subsets = {"train": [data["train"][i] for i in pick], "val": data["val"], "test": data["test"]}
    out = {}
    for name, examples in subsets.items():
        batches = eval_batches(examples, cfg.eval_batch_size, pad_id)
        result = evaluate(model, batches, device, cfg.loss_chunk_size)
        out[name] = {**result, "examples": len(examples)}
    return out


def evaluate_generation(model, tokenizer, records, cfg: Any, device: str, arm_dir: Path) -> dict:
    """Greedy answers on the first `gen_examples` test records; exact match against references."""
    records = records[: cfg.gen_examples]
    if not records:
        return {"examples": 0}
    answers, timing = generate_answers(
        model, tokenizer, records, device, cfg.gen_max_new_tokens, cfg.gen_batch_size
    )
    with (arm_dir / "generations.jsonl").open("w") as fh:
        for record, answer in zip(records, answers):
            fh.write(json.dumps({"record": record, "answer": answer}, ensure_ascii=False) + "\n")
    return {"examples": len(records), "exact_match": exact_match(records, answers), **timing}
