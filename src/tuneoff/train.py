"""One training loop for every method (`tuneoff.arm.run_arm` trains and evaluates one arm).

The loop reads top to bottom: accumulation windows of micro-batches, the loss of a window
normalized by the supervised tokens of the whole window, clip, step, schedule, log, validate.
Methods differ only in `prepare_model`; the base arm has no trainable weights and skips the loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from tuneoff import attention, measure
from tuneoff.batching import (
    epoch_batches,
    eval_batches,
    make_batch,
    packed_row_tokens,
    packing_isolates,
    split_by_tokens,
    supervised_tokens,
)
from tuneoff.checkpoint import CheckpointError, is_deepspeed, load_checkpoint, save_checkpoint
from tuneoff.config import Config
from tuneoff.data import IGNORE, Example
from tuneoff.evaluate import evaluate
from tuneoff.loss import forward_loss
from tuneoff.optim import make_optimizer

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs; saved as JSON in each checkpoint."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    windows: int = 0  # accumulation windows done in epoch `epoch` (stopped by max_steps)
    epoch_times_s: list[float] = field(default_factory=list)
    tokens: int = 0
    supervised_tokens: int = 0
    slots: int = 0  # tokens + padding
    examples_per_step: int = 0  # micro-batch x accumulation x processes (0: not recorded)

    def count(self, window: list, micro: list, supervised: int, examples: list[Example]) -> int:
        """One optimizer step done on `window`'s micro-batches; returns its tokens. Unsupervised
        copies (a process's filler for equal forward counts) are not data."""
        self.step += 1
        self.windows += 1
        tokens = sum(len(examples[i].input_ids) for idx, sup in window if sup for i in idx)
        self.tokens += tokens
        self.supervised_tokens += supervised
        self.slots += sum(b["input_ids"].numel() for (_, sup), b in zip(window, micro) if sup)
        return tokens


# --------------------------------------------------------------------------- setup


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int) -> Any:
    """Linear warmup over `warmup_steps`, then linear decay to 0 at the last step (or cosine
    decay, or constant)."""
    from transformers import get_scheduler

    names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    return get_scheduler(
        names[cfg.lr_schedule],
        optimizer,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=total_steps,
    )


def plan_steps(n_examples: int, cfg: Config, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). The last partial window is kept."""
    batches = math.ceil(n_examples / cfg.batch_size)
    per_epoch = math.ceil(batches / (cfg.grad_accum * world_size))
    total = per_epoch * cfg.epochs
    return per_epoch, min(total, cfg.max_steps) if cfg.max_steps else total


def epoch_windows(
    n_examples: int,
    cfg: Config,
    epoch: int,
    rank: int,
    world: int,
    lengths: list | None = None,
    equal_counts: bool = False,
) -> list:
    """This process's micro-batches of one epoch, grouped by accumulation window. Each entry is
    (example indices, supervised). A process left without a batch in the last window gets a
    copy of another's with supervision off, since DDP needs every process in each backward.
    `lengths` (the examples' token counts) group batches when `group_by_length` is on, and cut
    a window's examples by tokens when `micro_batch_tokens` is. `equal_counts` (FSDP, DeepSpeed:
    collectives in every forward or backward): each process runs as many micro-batches as the
    process with the most in that window, the extra ones copies with supervision off."""
    grouping = lengths if cfg.group_by_length else None
    batches = epoch_batches(n_examples, cfg.batch_size, cfg.seed, epoch, grouping)
    by_tokens = bool(cfg.micro_batch_tokens) and lengths is not None

    def micro(own: list, spare: list) -> list:
        if not own:
            return [(spare, False)]
        if by_tokens:
            examples = [i for b in own for i in b]
            budget, mode = cfg.micro_batch_tokens, cfg.batching
            return [
                (b, True) for b in split_by_tokens(examples, lengths, budget, mode, cfg.max_seq_len)
            ]
        return [(b, True) for b in own]

    size = cfg.grad_accum * world
    out = []
    for start in range(0, len(batches), size):
        window = batches[start : start + size]
        mine = micro(window[rank::world], window[0])
        if equal_counts:
            most = max(len(micro(window[r::world], window[0])) for r in range(world))
            mine += [(mine[0][0], False)] * (most - len(mine))
        out.append(mine)
    return out


def is_fsdp(accelerator: Any) -> bool:
    """Launched with FSDP (FSDP2: others are refused by `runs.check_launch`)."""
    return getattr(accelerator.state, "fsdp_plugin", None) is not None


def collective_backward(accelerator: Any) -> bool:
    """Every forward (FSDP, DeepSpeed ZeRO-3) or backward (ZeRO-2) has collectives: each process
    must run as many micro-batches per window as the others."""
    return is_fsdp(accelerator) or is_deepspeed(accelerator)


def configure_deepspeed(accelerator: Any, cfg: Config) -> None:
    """The run's config decides what DeepSpeed's would otherwise: the micro-batch, clipping, and
    accumulation, which the loop does itself (`run_window` marks each window's boundary, so a
    window may hold any number of micro-batches: `micro_batch_tokens`, a short last window)."""
    if not is_deepspeed(accelerator):
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ours = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * accelerator.num_processes,
        "gradient_clipping": cfg.max_grad_norm,
    }
    for key, value in ours.items():
        if ds.get(key, "auto") not in ("auto", value):
            log.warning("DeepSpeed config %s=%s replaced by %s (the run's)", key, ds[key], value)
        ds[key] = value


def loader_workers(cfg: Config) -> int:
    return min(cfg.num_workers, os.cpu_count() or 1)


def make_loader(
    examples: list[Example], micro: list, pad_id: int, cfg: Config, device: str, model=None
):
    """Collates micro-batches (`cfg.batching`; packed rows sized for `model`) in `num_workers`
    background processes (capped at the CPU count), each keeping 4 batches ready; pinned on
    CUDA so that copies overlap compute."""
    workers = loader_workers(cfg)
    config = getattr(getattr(model, "module", model), "config", None)  # DDP, PEFT: the base's
    varlen = getattr(config, "_attn_implementation", None) == attention.NAME
    row_tokens = packed_row_tokens(cfg.max_seq_len, getattr(config, "hidden_size", None), varlen)

    def load(item: tuple[list[int], bool]) -> dict[str, torch.Tensor]:
        idx, supervised = item
        batch = make_batch([examples[i] for i in idx], pad_id, cfg, row_tokens=row_tokens)
        if not supervised:
            batch["labels"] = torch.full_like(batch["labels"], IGNORE)
        return batch

    return torch.utils.data.DataLoader(
        micro,
        batch_size=None,
        collate_fn=load,
        num_workers=workers,
        pin_memory=device == "cuda",
        prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers and os.name == "posix" else None,
        # Its own generator: each iter() would otherwise draw a worker seed from torch's global
        # one, and a run resumed mid-epoch (after --max-steps) would draw other dropout masks.
        generator=torch.Generator(),
    )


# --------------------------------------------------------------------------- the loop


def run_window(
    model, accelerator, micro_batches: list[dict[str, torch.Tensor]], chunk_size: int = 0
) -> tuple[float, int]:
    """Forward and backward over one accumulation window (under DeepSpeed, also the engine's
    clipping and optimizer step); returns the window's mean loss over every process and this
    process's supervised tokens.

    Each micro-batch's summed loss is divided by the supervised tokens of the whole window
    (over all processes), so the gradient is the mean over every supervised token."""
    local = sum(supervised_tokens(b["labels"]) for b in micro_batches)
    total = local  # one process: no device round trip (each would stall the launch queue)
    if accelerator.num_processes > 1:
        total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    window_loss = torch.zeros((), device=accelerator.device)
    config = getattr(getattr(model, "module", model), "config", None)  # DDP, PEFT: the base's
    varlen = getattr(config, "_attn_implementation", None) == attention.NAME
    deepspeed = is_deepspeed(accelerator)
    for i, batch in enumerate(micro_batches):
        host = batch.get("position_ids")
        batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        if varlen and host is not None and host.device.type == "cpu":  # segments without a sync
            attention.remember_segments(batch["position_ids"], host)
        last = i == len(micro_batches) - 1
        if deepspeed:  # the engine reduces gradients, then clips and steps, at the boundary
            part = forward_loss(model, batch, chunk_size)
            model.set_gradient_accumulation_boundary(last)
            model.backward(part * accelerator.num_processes / max(total, 1))
            if last:
                model.step()
            window_loss += part.detach().float()
            continue
        with accelerator.no_sync(model) if not last else nullcontext():
            with accelerator.autocast():
                part = forward_loss(model, batch, chunk_size)
            # DDP averages gradients over processes; multiply back so the window is one mean.
            accelerator.backward(part * accelerator.num_processes / max(total, 1))
        window_loss += part.detach().float()
    if accelerator.num_processes > 1:
        return float(accelerator.reduce(window_loss, "sum")) / max(total, 1), local
    return float(window_loss) / max(local, 1), local  # the window's only host sync


def train(
    model: torch.nn.Module,
    accelerator: Any,
    data: dict[str, list[Example]],
    cfg: Config,
    arm_dir: Path,
    pad_id: int,
    resume: bool,
) -> dict[str, Any]:
    """Train `model` in place; returns timing and token counts. Writes metrics.jsonl and
    a checkpoint at each epoch end."""
    device = accelerator.device.type
    rank, world = accelerator.process_index, accelerator.num_processes
    per_epoch, total_steps = plan_steps(len(data["train"]), cfg, world)
    step_examples = cfg.batch_size * cfg.grad_accum * world  # the protocol's batch: say it
    log.info("%d optimizer steps (%d per epoch) of %d examples: %d a micro-batch x %d "
             "accumulated x %d processes", total_steps, per_epoch, step_examples, cfg.batch_size,
             cfg.grad_accum, world)  # fmt: skip
    optimizer = make_optimizer(model, cfg, device)
    # The schedule spans the planned epochs: --max-steps stops early, and a --resume given more
    # steps goes on with the lr the uninterrupted run would have had.
    scheduler = make_scheduler(optimizer, cfg, per_epoch * cfg.epochs)
    configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState(examples_per_step=step_examples)
    if resume and (arm_dir / "checkpoint" / "state.json").is_file():  # before any forward
        state = _resumed_state(arm_dir, model, optimizer, scheduler, accelerator, cfg)
    cfg = choose_batching(model, cfg, device)
    metrics_log = MetricsLog(
        arm_dir / "metrics.jsonl", state.step, write=accelerator.is_main_process
    )
    bar = tqdm(total=total_steps, initial=state.step, desc=cfg.method, unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # fmt: skip
    watch = measure.Stopwatch(device)
    model.train()
    for epoch in range(state.epoch, cfg.epochs):
        if state.step >= total_steps:
            break
        epoch_start = watch.total_s
        lengths = [len(e.input_ids) for e in data["train"]]
        schedule = epoch_windows(
            len(data["train"]), cfg, epoch, rank, world, lengths, collective_backward(accelerator)
        )
        begun = state.windows  # windows of this epoch done before a --resume
        todo = schedule[begun:]
        loader = iter(
            make_loader(data["train"], [m for w in todo for m in w], pad_id, cfg, device, model)
        )
        for window in todo:
            if state.step >= total_steps:
                break
            with watch:
                step_start = time.perf_counter()
                _maybe_inject_oom(cfg, state.step)
                micro = [next(loader) for _ in window]
                loss, supervised = run_window(model, accelerator, micro, cfg.loss_chunk_size)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                lr = scheduler.get_last_lr()[0]  # this step's: the scheduler then moves on
                optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - step_start
            tokens = state.count(window, micro, supervised, data["train"])
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / step_s:,.0f}", refresh=False)
            if state.step % cfg.log_every == 0 or state.step == total_steps:
                if world > 1:  # the step's tokens over every process (on logged steps only)
                    local = torch.tensor(tokens, device=accelerator.device)
                    tokens = int(accelerator.reduce(local, "sum"))
                row = {"step": state.step, "epoch": epoch + 1, "loss": loss,
                       "lr": lr, "grad_norm": float(grad_norm),
                       "tokens": tokens, "tokens_per_s": tokens / step_s}  # fmt: skip
                metrics_log.train(row, watch.total_s, device)
            last = state.step == total_steps or state.windows == len(schedule)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and not last:  # else below
                metrics_log.eval(model, data["val"], cfg, device, pad_id, state.step, epoch + 1)
        if begun:  # the rest of an epoch begun before a --resume: one epoch, one time
            state.epoch_times_s[-1] += watch.total_s - epoch_start
        else:
            state.epoch_times_s.append(watch.total_s - epoch_start)
        if state.windows == len(schedule):
            state.epoch, state.windows = epoch + 1, 0
        # else max_steps stopped mid-epoch: a --resume with more steps goes on from there
        metrics_log.eval(model, data["val"], cfg, device, pad_id, state.step, epoch + 1)
        if cfg.save_checkpoints:  # every process: FSDP gathers its shards to the main one
            totals = _global_counts(state, accelerator)  # every process's tokens so far
            save_checkpoint(
                arm_dir / "checkpoint", model, optimizer, scheduler, accelerator, totals
            )
        if not state.windows:
            _maybe_interrupt(state.epoch)
    bar.close()
    totals = _global_counts(state, accelerator)
    return {
        **_training_summary(totals, total_steps, per_epoch),
        "examples_per_step": step_examples,
        "batching": cfg.batching,
    }


def _resumed_state(arm_dir: Path, model, optimizer, scheduler, accelerator, cfg) -> TrainState:
    """The checkpoint's state, loaded into model, optimizer and scheduler; refused when it took
    another number of examples per optimizer step than this launch."""
    world = accelerator.num_processes
    step_examples = cfg.batch_size * cfg.grad_accum * world
    saved = load_checkpoint(arm_dir / "checkpoint", model, optimizer, scheduler, accelerator)
    state = TrainState(**saved)
    if accelerator.process_index:  # the counts saved are every process's: rank 0 carries them on
        state.tokens = state.supervised_tokens = state.slots = 0
    if state.examples_per_step not in (0, step_examples):
        raise CheckpointError(
            f"checkpoint {arm_dir / 'checkpoint'} took {state.examples_per_step} examples "
            f"per optimizer step, this launch {step_examples} ({cfg.batch_size} x "
            f"{cfg.grad_accum} x {world} processes): resume with batch_size x grad_accum x "
            "processes as before, or rerun without --resume (with --overwrite)"
        )
    log.info("resuming after epoch %d, step %d", state.epoch, state.step)
    state.examples_per_step = step_examples
    return state


def _global_counts(state: TrainState, accelerator: Any) -> TrainState:
    """Token counts summed over every process (each counted its own micro-batches)."""
    if accelerator.num_processes == 1:
        return state
    keys = ("tokens", "supervised_tokens", "slots")
    local = torch.tensor([getattr(state, k) for k in keys], device=accelerator.device)
    summed = accelerator.reduce(local, "sum").tolist()
    return TrainState(**{**state.__dict__, **dict(zip(keys, map(int, summed)))})


def choose_batching(model: torch.nn.Module, cfg: Config, device: str) -> Config:
    """Packed batches need an attention that keeps examples apart by their position ids alone
    (transformers' sdpa, eager and flash attention do); checked once, else `longest`."""
    if cfg.batching != "packed" or packing_isolates(model, device):
        return cfg
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "unknown")
    log.warning("attention %r lets packed examples see each other: batching=longest", impl)
    return cfg.replace(batching="longest")


def _training_summary(state: TrainState, total: int, per_epoch: int) -> dict:
    """Training-only figures: evaluation, checkpointing and start-up are not in the times."""
    train_s = sum(state.epoch_times_s)  # includes epochs done before a resume
    epochs = state.step / per_epoch if per_epoch else 0.0
    return {
        "optimizer_steps": state.step,
        "planned_steps": total,
        "steps_per_epoch": per_epoch,
        "epochs_completed": epochs,
        "time_per_epoch_s": train_s / epochs if epochs else None,
        "epoch_times_s": state.epoch_times_s,
        "train_time_s": train_s,
        "train_tokens": state.tokens,
        "train_supervised_tokens": state.supervised_tokens,
        "train_tokens_per_s": state.tokens / train_s if train_s else None,
        "train_supervised_tokens_per_s": state.supervised_tokens / train_s if train_s else 0.0,
        "padding_fraction": 1 - state.tokens / state.slots if state.slots else 0.0,
    }


class MetricsLog:
    """The per-step log `metrics.jsonl`; on resume, lines after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until_step: int, write: bool = True) -> None:
        self.path, self.writes = path, write  # under several processes, the main one writes
        if not write:
            return
        kept = []
        if keep_until_step and path.is_file():
            lines = path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["step"] <= keep_until_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.writes:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def train(self, row: dict[str, Any], time_s: float, device: str) -> None:
        memory_gib = measure.peak_memory_gib(measure.measure_memory(device))
        self.write({"event": "train", **row, "time_s": time_s, "memory_gib": memory_gib})

    def eval(self, model, examples, cfg, device, pad_id, step: int, epoch: int) -> None:
        if not examples:  # val_fraction=0: nothing to log
            return
        batches = eval_batches(examples, cfg.eval_batch_size, pad_id)
        result = evaluate(model, batches, device, cfg.loss_chunk_size)
        self.write({"event": "eval", "split": "val", "step": step, "epoch": epoch, **result})


# --------------------------------------------------------------------------- test hooks


def _maybe_inject_oom(cfg: Config, step: int) -> None:
    """TUNEOFF_TEST_OOM=<method>[@rank]: raise a CUDA-style OOM in that arm (in that process
    only, with @rank) (tests the 'oom' row)."""
    method, _, rank = os.environ.get("TUNEOFF_TEST_OOM", "").partition("@")
    if method == cfg.method and rank in ("", os.environ.get("RANK", "0")) and step == 0:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated by TUNEOFF_TEST_OOM)")


def _maybe_interrupt(epochs_done: int) -> None:
    """TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH=k: stop as if killed after epoch k's checkpoint."""
    if os.environ.get("TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH") == str(epochs_done):
        raise KeyboardInterrupt


def micro_batch_tokens(examples: list[Example], cfg: Config) -> float | None:
    """Mean tokens of a micro-batch of these examples (what CPU `precision=auto` weighs)."""
    if not examples:
        return None
    mean = sum(len(e.input_ids) for e in examples) / len(examples)
    if not cfg.micro_batch_tokens:
        return mean * min(cfg.batch_size, len(examples))
    # A step's tokens spread evenly over as many micro-batches as the budget needs (each
    # filled to about half an example short of it).
    step = mean * min(cfg.batch_size * cfg.grad_accum, len(examples))
    return step / math.ceil(step / max(cfg.micro_batch_tokens - mean / 2, mean))
