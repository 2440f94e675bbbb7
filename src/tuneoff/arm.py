"""One arm in this process: tokenize the run's splits, choose device and precision, prepare the
model (the only place where methods differ), train it with the one loop, evaluate it, save it,
and write its `summary.json`."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tuneoff import measure
from tuneoff.checkpoint import gather_weights, is_deepspeed, share_like_other_files, zero_stage
from tuneoff.config import Config, write_yaml
from tuneoff.data import DataError, read_splits, tokenize_split
from tuneoff.evaluate import evaluate_generation, evaluate_splits
from tuneoff.model import (
    Runtime,
    choose_runtime,
    compile_model,
    count_parameters,
    load_model,
    load_tokenizer,
    prepare_model,
)
from tuneoff.train import configure_deepspeed, is_fsdp, loader_workers, micro_batch_tokens, train

log = logging.getLogger(__name__)


def run_arm(cfg: Config, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train (method 'base': only evaluate) one arm in this process and write its outputs:
    config.yaml, metrics.jsonl, summary.json, generations.jsonl, adapter/ or model/."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    splits, manifest = read_splits(run_dir / "splits")
    data, counts = {}, {}
    for name, records in splits.items():
        data[name], counts[name] = tokenize_split(records, tokenizer, cfg)
        if records and not data[name]:
            raise DataError(
                f"all {len(records)} {name} examples were dropped: not one response token fits "
                f"in max_seq_len={cfg.max_seq_len}; raise max_seq_len"
            )
    runtime = choose_runtime(cfg, micro_batch_tokens(data["train"], cfg))
    log.info("device %s, precision %s (%s)", runtime.device, runtime.precision, runtime.reason)
    accelerator = Accelerator(cpu=runtime.device == "cpu", mixed_precision=runtime.mixed_precision)
    if zero_stage(accelerator) == 3 and cfg.loss_chunk_size:
        log.warning("ZeRO-3 partitions the lm head, which the chunked loss reads outside its "
                    "module: loss_chunk_size=0 (full-vocabulary logits)")  # fmt: skip
        cfg = cfg.replace(loss_chunk_size=0)
    distributed = _distributed(accelerator, cfg.method)
    budget = apply_memory_budget(cfg, runtime)
    arm_dir = run_dir / cfg.method
    arm_dir.mkdir(parents=True, exist_ok=True)
    if resume and (arm_dir / "checkpoint" / "state.json").is_file():
        check_resumed_config(cfg, arm_dir / "config.yaml")
    if accelerator.is_main_process:
        write_yaml(cfg, arm_dir / "config.yaml")
    set_seed(cfg.seed)
    model = load_model(cfg.model)
    set_seed(cfg.seed)  # adapters are initialized from this seed in every arm
    model = prepare_model(model, cfg, runtime)
    if cfg.compile:
        compile_model(model)
    summary = _summary_head(cfg, runtime, model, counts, manifest, accelerator)
    summary["runtime"]["distributed"] = distributed
    summary["memory_plan"] = _memory_plan(cfg, runtime, budget, accelerator=accelerator,
                                          distributed=distributed)  # fmt: skip
    measure.reset_peak_memory(runtime.device)
    try:
        if cfg.method != "base":
            summary["training"] = train(
                model, accelerator, data, cfg, arm_dir, tokenizer.pad_token_id, resume
            )
            summary["memory"] = measure.measure_memory(runtime.device)  # the training peak
        else:
            model = _prepare_for_evaluation(model, accelerator, cfg)
        pad_id = tokenizer.pad_token_id
        summary["metrics"] = evaluate_splits(model, data, cfg, runtime.device, pad_id)
        test = splits["test"]
        summary["generation"] = evaluate_generation(
            model, tokenizer, test, cfg, runtime.device, arm_dir
        )
        summary["outputs"] = _save_outputs(model, accelerator, tokenizer, cfg, arm_dir)
        summary["status"] = "ok"
    except torch.OutOfMemoryError as err:
        log.error("%s arm ran out of memory: %s", cfg.method, str(err).splitlines()[0])
        summary["status"], summary["error"] = "oom", str(err).splitlines()[0]
        summary["memory"] = measure.measure_memory(runtime.device)  # reached before the OOM
        launch = {"accelerator": accelerator, "distributed": distributed}
        plan = _memory_plan(cfg, runtime, budget, advice=True, **launch)
        summary["advice"] = plan.get("advice")  # per process under DDP, FSDP2 or DeepSpeed
    summary["memory_overall"] = measure.measure_memory(runtime.device)  # evaluation included
    summary.setdefault("memory", summary["memory_overall"])
    summary["total_time_s"] = time.perf_counter() - started
    if summary["status"] == "oom" and accelerator.num_processes > 1:
        # The other processes wait in a collective this one will never join: it writes the
        # 'oom' row itself and ends the launch (the launcher stops the others).
        summary["error"] += f" (process {accelerator.process_index})"
        (arm_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if accelerator.is_main_process:
        (arm_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def check_resumed_config(cfg: Config, saved: Path) -> None:
    """A --resume goes on with the arm's own config: only keys that change nothing about the
    training (`RESUMABLE_KEYS`: --max-steps, evaluation, logging) may differ."""
    from tuneoff.checkpoint import CheckpointError
    from tuneoff.config import RESUMABLE_KEYS, read_yaml

    if not saved.is_file():
        return
    before, now = read_yaml(saved), cfg.to_dict()
    changed = [k for k in now if k not in RESUMABLE_KEYS and before.get(k, now[k]) != now[k]]
    if changed:
        what = ", ".join(f"{k}={before[k]!r} now {now[k]!r}" for k in changed[:3])
        raise CheckpointError(
            f"{saved.parent} was trained with other settings ({what}): resume with the arm's "
            f"config ({saved}), or rerun without --resume (with --overwrite)"
        )


def apply_memory_budget(cfg: Config, runtime: Runtime) -> int | None:
    """`memory_budget`: cap this process's CUDA caching allocator, so a large GPU behaves like
    a small one. Returns the budget in bytes (None: no budget, or not on CUDA)."""
    from tuneoff.config import parse_size

    if cfg.memory_budget is None:
        return None
    budget = parse_size(cfg.memory_budget, "memory_budget")
    if runtime.device != "cuda":
        log.warning("memory_budget %s applies to CUDA only; ignored on CPU", cfg.memory_budget)
        return None
    total = torch.cuda.get_device_properties(accelerator_index()).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), accelerator_index())
    log.info("memory budget %.2f GiB of this GPU's %.2f GiB", budget / 2**30, total / 2**30)
    return budget


def accelerator_index() -> int:
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def _memory_plan(
    cfg: Config, runtime: Runtime, budget: int | None, advice: bool = False, **launch: Any
):
    """The planner's prediction for this arm, per process under DDP, FSDP2 or DeepSpeed (world
    size and kind from `launch`'s accelerator), recorded beside the measured peak; with
    `advice` the cheapest settings that fit the budget (per process too). Tracing an unusual
    architecture on the meta device can fail; that is recorded, and the run goes on."""
    from tuneoff.config import ConfigError
    from tuneoff.model import ModelError, load_arch_config
    from tuneoff.plan import advise
    from tuneoff.sharding import of_accelerator, predict_for

    try:
        arch = load_arch_config(cfg.model)
        sharding = None
        if launch:
            hidden = getattr(arch, "hidden_size", 0)
            sharding = of_accelerator(launch["accelerator"], launch["distributed"], hidden)
        pred = predict_for(cfg, arch, runtime, sharding, both_checkpointing=False)
        out: dict[str, Any] = {"predicted": pred.to_dict()}
        if advice:
            limit = budget or (
                torch.cuda.get_device_properties(accelerator_index()).total_memory
                if runtime.device == "cuda"
                else pred.peak_allocated
            )
            out["advice"] = advise(cfg, arch, runtime, limit, pred, sharding)
        return out
    except (ConfigError, ModelError, RuntimeError, NotImplementedError, ValueError) as err:
        log.warning("memory prediction unavailable: %s", str(err).splitlines()[0][:200])
        return {"error": str(err).splitlines()[0][:200]}


def _summary_head(cfg, runtime: Runtime, model, counts, manifest, accelerator) -> dict[str, Any]:
    return {
        "status": "running",
        "method": cfg.method,
        "config": cfg.to_dict(),
        "runtime": {
            **measure.describe_device(runtime.device),
            "precision": runtime.precision,
            "precision_reason": runtime.reason,
            "world_size": accelerator.num_processes,
            "dataloader_workers": loader_workers(cfg),
        },
        "versions": measure.measure_versions(),
        "git_sha": measure.git_sha(),
        "params": count_parameters(model),
        "data": {
            "splits": counts,
            "split_sha256": {k: v["sha256"] for k, v in manifest["files"].items()},
        },
    }


def _prepare_for_evaluation(model, accelerator, cfg: Config):
    """The base arm: no DDP or FSDP wrapper (each refuses a model with nothing to train), so
    every process holds the whole model; under ZeRO-3, which loaded it partitioned, DeepSpeed's
    engine (without an optimizer) gathers each layer's weights for its forward."""
    if zero_stage(accelerator) != 3:
        return accelerator.prepare_model(model, evaluation_mode=True)
    configure_deepspeed(accelerator, cfg)
    return accelerator.prepare(model)


def _distributed(accelerator, method: str) -> str:
    """How the processes share the work: none, ddp, fsdp2 or deepspeed-zero1/2/3; unwrapped for
    the base arm, which each process evaluates whole (except under ZeRO-3)."""
    if accelerator.num_processes == 1 and not is_deepspeed(accelerator):
        return "none"
    if method == "base" and zero_stage(accelerator) != 3:
        return "unwrapped"
    if is_fsdp(accelerator):
        return "fsdp2"
    if is_deepspeed(accelerator):
        return f"deepspeed-zero{zero_stage(accelerator)}"
    return "ddp"


def _save_outputs(model, accelerator, tokenizer, cfg: Config, arm_dir: Path) -> dict[str, str]:
    """lora/qlora: PEFT adapter (PeftModel.from_pretrained); full: safetensors model
    (AutoModelForCausalLM.from_pretrained); both with the tokenizer. base: nothing. Every
    process calls it (FSDP gathers the weights, DeepSpeed its fp32 masters); the main process
    writes."""
    if cfg.method == "base":
        return {}
    target = arm_dir / ("model" if cfg.method == "full" else "adapter")
    weights = gather_weights(model, trainable_only=cfg.method != "full")
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(
            target, safe_serialization=True, state_dict=weights
        )
        tokenizer.save_pretrained(target)
        share_like_other_files(target)
    accelerator.wait_for_everyone()
    return {cfg.method: target.name}
