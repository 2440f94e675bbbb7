"""Evaluation: loss, perplexity, token accuracy, bits per token, and generation exact match.

Every metric is over supervised tokens only, with the shift done right: the logits at position t
predict the label at t + 1. (The reference compared unshifted positions, which is why its token
accuracy read 0.009 at perplexity 3.6.) Forward passes are timed apart from generation.

Under several processes (DDP, FSDP, DeepSpeed) each evaluates its share of the batches and of
the generation prompts, and the sums are reduced: the metrics of one process, N times sooner.
"""

from __future__ import annotations

import json
import math
import random
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from tuneoff.batching import eval_batches
from tuneoff.data import prompt_ids, response_text
from tuneoff.loss import forward_stats
from tuneoff.measure import Stopwatch


def summarize(total_loss: float, correct: int, tokens: int) -> dict[str, float | None]:
    """Per-token metrics; None (JSON null, shown as -) for a split without tokens (e.g.
    val_fraction=0), where NaN would not be JSON."""
    if not tokens:
        return dict.fromkeys(("loss", "perplexity", "token_accuracy", "bits_per_token"))
    loss = total_loss / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "token_accuracy": correct / tokens,
        "bits_per_token": loss / math.log(2),
    }


_WARMED: weakref.WeakSet = weakref.WeakSet()  # not ids: a new model may reuse a freed id


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
    rank, world = processes()
    mine = batches[rank::world]
    if batches and model not in _WARMED:
        # One untimed pass per model and process: start-up (CUDA context and kernels, oneDNN
        # kernels, the allocator's first blocks) is not throughput, and the base arm evaluates
        # first in its process while the other arms evaluate after training.
        forward_stats(model, {k: v.to(device) for k, v in batches[0].items()}, chunk_size)
        _WARMED.add(model)
    for batch in mine:
        batch = {k: v.to(device) for k, v in batch.items()}
        with watch:
            part_loss, part_correct, part_tokens = forward_stats(model, batch, chunk_size)
        total_loss += part_loss
        correct += part_correct
        supervised += part_tokens
        seen += _real_tokens(batch)
    # Untimed, discarded passes so that every process runs as many forwards (FSDP's, and DDP's
    # buffer broadcasts, are collectives).
    for _ in range(-(-len(batches) // world) - len(mine)):
        forward_stats(model, {k: v.to(device) for k, v in batches[0].items()}, chunk_size)
    model.train(was_training)
    total_loss, correct, supervised, seen = _sum_over_processes(
        [total_loss, correct, supervised, seen], device
    )
    elapsed = _max_over_processes(watch.total_s, device)  # wall time of the slowest
    return {
        **summarize(total_loss, int(correct), int(supervised)),
        "supervised_tokens": int(supervised),
        "tokens": int(seen),
        "eval_time_s": elapsed,
        "tokens_per_s": seen / elapsed if elapsed else None,
    }


def processes() -> tuple[int, int]:
    """(rank, number) of the processes evaluating together; (0, 1) in one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_processes(values: list[float], device: str) -> list[float]:
    if processes()[1] == 1:
        return values
    import torch.distributed as dist

    summed = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(summed)
    return summed.tolist()


def _max_over_processes(value: float, device: str) -> float:
    if processes()[1] == 1:
        return value
    import torch.distributed as dist

    most = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return float(most)


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
        "generation_tokens_per_s": new_tokens / watch.total_s if watch.total_s else None,
    }
    return answers, timing


def exact_match(records: list[dict], answers: list[str]) -> float:
    """Share of answers equal to the reference response, whitespace stripped at both ends."""
    hits = sum(a.strip() == response_text(r).strip() for r, a in zip(records, answers))
    return hits / len(records) if records else None


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
    rank, world = processes()
    # FSDP's and ZeRO-3's forwards are collectives, and answers end at different steps: there
    # every process answers every prompt. Elsewhere each answers its share.
    sharded = any(isinstance(p, DTensor) or hasattr(p, "ds_id") for p in model.parameters())
    share = world > 1 and not sharded
    mine = records[rank::world] if share else records
    answers, timing = generate_answers(
        model, tokenizer, mine, device, cfg.gen_max_new_tokens, cfg.gen_batch_size
    )
    if share:
        import torch.distributed as dist

        every: list = [None] * world
        dist.all_gather_object(every, (answers, timing))
        answers = [every[i % world][0][i // world] for i in range(len(records))]
        seconds = max(t["generation_time_s"] for _, t in every)
        tokens = sum(t["generated_tokens"] for _, t in every)
        timing = {
            "generation_time_s": seconds,
            "generated_tokens": tokens,
            "generation_tokens_per_s": tokens / seconds if seconds else None,
        }
    if rank == 0:
        with (arm_dir / "generations.jsonl").open("w") as fh:
            for record, answer in zip(records, answers):
                line = {"record": record, "answer": answer}
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {"examples": len(records), "exact_match": exact_match(records, answers), **timing}
