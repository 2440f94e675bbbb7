"""The process of one `tuneoff bench` arm: build the model, train on the shared examples,
write its result JSON (`python -m tuneoff.bench_worker --worker SPEC`).

Arms:
- tuneoff's methods (`lora`, `full`, `qlora`): the real step of `train.py` (`run_window`, clip,
  `optim.make_optimizer`, scheduler) after `prepare_model`, with the config's fast path
  (precision auto unless `precision=` is given).
- `seed`, the reference recipe (LoRA): the same step with fp32 weights, fp16 autocast and a
  GradScaler on CUDA (fp32 on CPU), every sequence padded to max_seq_len, full-vocabulary logits,
  plain (foreach) AdamW, torch's dropout, micro-batch 4 (or `--batch-size`) and the accumulation
  that makes the same examples per optimizer step.
- `trl`: TRL's SFTTrainer with a PEFT LoraConfig, the same hyperparameters (r, alpha, dropout,
  targets, lr, warmup, schedule, clip, batch, accumulation, max_length), the same tokenized
  examples in the same order (a sequential sampler; labels given, prompt tokens -100) and TRL's
  defaults otherwise (gradient checkpointing, bf16 autocast on GPU, the checkpoint's dtype, which
  its `dtype="auto"` loading would give). On CPU its bf16 autocast follows tuneoff's precision
  (bf16 with `precision=bf16`, or with `auto` on a CPU with native bf16 and micro-batches of
  at least `model.CPU_BF16_MIN_TOKENS` tokens; else fp32).

Timing: `--warmup-steps` optimizer steps are run first and excluded; the clock then runs over
`--steps` steps, synchronized with the device, data loading included. `optimizer_step_ms` is the
mean time of clip + optimizer step + scheduler + zero_grad, read from CUDA events (no extra sync).

MFU (model FLOPs utilization) counts the FLOPs the arm's method needs, never wasted work (padding,
prompt-position logits, recomputation), so it is proportional to useful throughput:
  per token of an example of length l:  (4 + 2f) * P_body + 6 * P_lora
  per supervised token (the lm head):   (4 + 2f) * V * d
  per example (causal attention):       6 * d_attn * n_layers * l^2
with f = 1 when every weight trains (forward 2, backward to activations 2, to weights 2) and 0
for LoRA (frozen weights need no weight gradient; the adapters' own 6 * P_lora is counted);
P_body = parameters outside the embeddings and lm head; d_attn = heads x head_dim. MFU =
FLOPs / time / the device's dense bf16 (fp16) tensor peak from `PEAK_FLOPS` (None where unknown,
and on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneoff import measure
from tuneoff.bench import bench_tokenizer, read_examples, supervised_count
from tuneoff.config import Config
from tuneoff.data import Example

log = logging.getLogger(__name__)

# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s, from NVIDIA's datasheets; the
# GeForce figures are fp16 with fp32 accumulation. Matched in order against the device name.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 4080", 97.5e12),
)


# --------------------------------------------------------------------------- FLOPs


@dataclass
class ModelShape:
    body_params: int  # outside the input embeddings and lm head
    head_params: int  # vocab x hidden
    attn_dim: int  # heads x head_dim
    layers: int

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShape:
        """From the unprepared model (before LoRA or quantization change its parameters)."""
        config = model.config
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        total = sum(p.numel() for p in model.parameters())  # tied weights once
        body = total - embed.numel() - (head.numel() if head is not embed else 0)
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        return cls(
            body, head.numel(), config.num_attention_heads * head_dim, config.num_hidden_layers
        )


def model_flops(examples: list[Example], shape: ModelShape, full: bool, lora_params: int) -> float:
    """The FLOPs the method needs for these examples (formula in the module docstring)."""
    f = 1 if full else 0
    total = 0.0
    for e in examples:
        n = len(e.input_ids)
        total += ((4 + 2 * f) * shape.body_params + 6 * lora_params) * n
        total += (4 + 2 * f) * shape.head_params * supervised_count(e)
        total += 6 * shape.attn_dim * shape.layers * n * n
    return total


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


# --------------------------------------------------------------------------- timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- workers


def random_model(name: str, device: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The architecture of `name` with random weights, built directly on `device`."""
    from transformers import AutoModelForCausalLM

    from tuneoff.model import load_arch_config

    config = load_arch_config(name)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def windows_of(n_steps: int, cfg: Config, lengths: list[int]) -> list[list[tuple[list[int], bool]]]:
    """Optimizer step k takes examples [k*E, (k+1)*E), E = batch_size x grad_accum, in micro-batches
    of batch_size (or of at most `micro_batch_tokens`): the same examples per step whatever the
    micro-batch."""
    from tuneoff.batching import split_by_tokens

    per_step = cfg.batch_size * cfg.grad_accum
    windows = []
    for start in range(0, n_steps * per_step, per_step):
        step = list(range(start, start + per_step))
        if cfg.micro_batch_tokens:
            budget, batching = cfg.micro_batch_tokens, cfg.batching
            micro = split_by_tokens(step, lengths, budget, batching, cfg.max_seq_len)
        else:
            micro = [step[m : m + cfg.batch_size] for m in range(0, per_step, cfg.batch_size)]
        windows.append([(idx, True) for idx in micro])
    return windows


def _dtypes(model: torch.nn.Module, trainable: bool) -> dict[str, int]:
    counts = Counter(str(p.dtype) for p in model.parameters() if p.requires_grad == trainable)
    return dict(counts)


def tuneoff_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One tuneoff arm (or the seed baseline): train.py's step on the shared examples."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from tuneoff import attention
    from tuneoff.model import choose_runtime, compile_model, count_parameters, prepare_model
    from tuneoff.optim import make_optimizer
    from tuneoff.train import choose_batching, make_loader, make_scheduler, run_window

    cfg = Config(**spec["config"])
    examples = read_examples(spec["examples"])
    warmup, steps = spec["warmup_steps"], spec["steps"]
    runtime = choose_runtime(cfg, _micro_tokens(examples, cfg, warmup + steps))
    device = runtime.device
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision=runtime.mixed_precision)
    set_seed(cfg.seed)
    model = random_model(cfg.model, device)
    shape = ModelShape.of(model)
    set_seed(cfg.seed)
    model = prepare_model(model, cfg, runtime)
    if cfg.compile:
        compile_model(model)
    params = count_parameters(model)
    optimizer = make_optimizer(model, cfg, device)
    scheduler = make_scheduler(optimizer, cfg, warmup + steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    cfg = choose_batching(model, cfg, device)
    windows = windows_of(warmup + steps, cfg, [len(e.input_ids) for e in examples])
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    schedule = [m for w in windows for m in w]
    loader = iter(make_loader(examples, schedule, pad_id, cfg, device, model))
    clock = measure.StepClock(device)
    measure.reset_peak_memory(device)
    model.train()
    losses, slots, shapes, keys = [], 0, [], []
    largest_step = max(  # the measured window with the most tokens: the same in every arm
        range(warmup, len(windows)),
        key=lambda k: sum(len(examples[i].input_ids) for idx, _ in windows[k] for i in idx),
    )
    largest: list[dict] = []
    started = 0.0
    for step, window in enumerate(windows):
        if step == warmup:
            _sync(device)
            started = time.perf_counter()
        micro = [next(loader) for _ in window]
        loss, _ = run_window(model, accelerator, micro, cfg.loss_chunk_size)
        measured = step >= warmup
        if measured:
            clock.start()
        accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if measured:
            clock.stop()
            slots += sum(b["input_ids"].numel() for b in micro)
            shapes += [list(b["input_ids"].shape) for b in micro]
            keys = sorted(micro[0])
            if step == largest_step:
                largest = micro
        losses.append(loss)
    _sync(device)
    elapsed = time.perf_counter() - started
    memory = measure.measure_memory(device)
    if device == "cpu":  # RSS mostly shows glibc's heap: also the tensors' own peak, untimed
        memory["peak_step_tensors_gib"] = _window_tensor_peak(model, accelerator, largest, cfg)
    used = [examples[i] for w in windows[warmup:] for idx, _ in w for i in idx]
    flops = model_flops(
        used, shape, cfg.method == "full", params["trainable"] if cfg.method != "full" else 0
    )
    return {
        **_throughput(used, slots, elapsed, flops, device),
        "optimizer_step_ms": clock.mean_ms(),
        "memory": memory,
        "params": params,
        "precision": runtime.precision,
        "batching": cfg.batching,
        "loss_chunk_size": cfg.loss_chunk_size,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "micro_batch_tokens": cfg.micro_batch_tokens,
        "batch_shapes": shapes,
        "batch_keys": keys,
        "frozen_dtypes": _dtypes(accelerator.unwrap_model(model), trainable=False),
        "trainable_dtypes": _dtypes(accelerator.unwrap_model(model), trainable=True),
        "attention": getattr(accelerator.unwrap_model(model).config, "_attn_implementation", None),
        "attention_calls": dict(attention.calls),  # which varlen path ran (tuneoff_varlen only)
        "losses": losses,
    }


def _micro_tokens(examples: list[Example], cfg: Config, n_steps: int) -> float | None:
    """Mean tokens per micro-batch over the examples these steps use (CPU auto precision)."""
    from tuneoff.train import micro_batch_tokens

    used = examples[: n_steps * cfg.batch_size * cfg.grad_accum]
    return micro_batch_tokens(used, cfg)


def _window_tensor_peak(model, accelerator, micro: list[dict], cfg: Config) -> float:
    """GiB of the peak of tensors alive at once during one more forward and backward of the
    window (activations, logits, temporaries and gradients; weights and optimizer states
    apart): exact (`measure.TensorMemory`), where a CPU process's RSS also holds the C
    allocator's free but unreturned memory."""
    from tuneoff.train import run_window

    with measure.TensorMemory(model, tuple(t for b in micro for t in b.values())) as tracked:
        run_window(model, accelerator, micro, cfg.loss_chunk_size)
    model.zero_grad(set_to_none=True)
    return (tracked.peak_bytes + tracked.grad_bytes) / measure.GIB


def _throughput(used: list[Example], slots: int, elapsed: float, flops: float, device: str) -> dict:
    tokens = sum(len(e.input_ids) for e in used)
    supervised = sum(supervised_count(e) for e in used)
    peak = peak_flops(device)
    return {
        "time_s": elapsed,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "slots": slots,
        "supervised_tokens_per_s": supervised / elapsed,
        "tokens_per_s": tokens / elapsed,
        "padding_fraction": 1 - tokens / slots if slots else 0.0,
        "flops_per_token": flops / tokens,
        "mfu": flops / elapsed / peak if peak else None,
        "peak_flops": peak,
    }


def trl_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL's SFTTrainer + PEFT on the shared examples, timed by a TrainerCallback."""
    try:
        import datasets
        import trl
        from transformers import PrinterCallback, TrainerCallback
    except ImportError as err:
        return {
            "status": "skipped",
            "reason": f"TRL unavailable ({err}): pip install 'tuneoff[bench]'",
        }
    from accelerate.utils import set_seed

    from tuneoff.model import choose_runtime, count_parameters, load_arch_config, lora_config

    datasets.disable_progress_bars()
    cfg = Config(**spec["config"])
    examples = read_examples(spec["examples"])
    warmup, steps = spec["warmup_steps"], spec["steps"]
    runtime = choose_runtime(cfg, _micro_tokens(examples, cfg, warmup + steps))  # as tuneoff's
    device = runtime.device
    config = load_arch_config(cfg.model)
    dtype = getattr(config, "dtype", None) or torch.float32  # what dtype="auto" would load
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    set_seed(cfg.seed)
    model = random_model(cfg.model, device, torch.float32)
    shape = ModelShape.of(model)
    model.to(dtype)
    per_step = cfg.batch_size * cfg.grad_accum
    data = examples[: (warmup + steps) * per_step]
    train_set = datasets.Dataset.from_dict(
        {"input_ids": [e.input_ids for e in data], "labels": [e.labels for e in data]}
    )
    bf16 = runtime.precision == "bf16"
    args = trl_args(trl, cfg, spec["work_dir"], warmup + steps, device, bf16)
    lora = lora_config(cfg)

    clock = measure.StepClock(device)
    started: list[float] = []  # when the first timed step began to fetch its batches
    ends: list[float] = []

    class InOrder(trl.SFTTrainer):
        """SFTTrainer reading the examples in file order, so its batches equal the other arms'."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def get_batch_samples(self, *args, **kwargs):
            # the clock starts before the first timed step takes its batches, as tuneoff's arms'
            # does (at step `warmup`, before `next(loader)`): with no warm-up steps too
            if self.state.global_step == warmup and not started:
                _sync(device)
                started.append(time.perf_counter())
            return super().get_batch_samples(*args, **kwargs)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > warmup:
                clock.stop()
            _sync(device)
            ends.append(time.perf_counter())

    set_seed(cfg.seed)
    trainer = InOrder(
        model=model,
        args=args,
        train_dataset=train_set,
        processing_class=_trl_tokenizer(cfg.model, model.config),
        peft_config=lora,
        callbacks=[Clock()],
    )
    clip = trainer.accelerator.clip_grad_norm_

    def timed_clip(*a, **kw):  # the step's clock starts at clipping, as in tuneoff's arms
        if trainer.state.global_step >= warmup:
            clock.start()
        return clip(*a, **kw)

    trainer.accelerator.clip_grad_norm_ = timed_clip
    trainer.remove_callback(PrinterCallback)  # its log lines would interleave with the table
    shapes: list[list[int]] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(list(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    measure.reset_peak_memory(device)
    trainer.train()
    elapsed = ends[-1] - started[0]
    measured = shapes[-steps * cfg.grad_accum :]
    used = data[-steps * per_step :]
    lora_params = count_parameters(trainer.model)["trainable"]
    flops = model_flops(used, shape, False, lora_params)
    return {
        **_throughput(used, sum(math.prod(s) for s in measured), elapsed, flops, device),
        "optimizer_step_ms": clock.mean_ms(),
        "memory": measure.measure_memory(device),
        "params": count_parameters(trainer.model),
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "batching": "longest",
        "loss_chunk_size": 0,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_shapes": measured,
        "frozen_dtypes": _dtypes(trainer.model, trainable=False),
        "trainable_dtypes": _dtypes(trainer.model, trainable=True),
        "trl_version": trl.__version__,
    }


def trl_args(
    trl: Any, cfg: Config, work_dir: str, max_steps: int, device: str, bf16: bool = True
) -> Any:
    """SFTConfig with tuneoff's hyperparameters; TRL's defaults for everything else."""
    schedules = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
    return trl.SFTConfig(
        output_dir=work_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_eps,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=schedules[cfg.lr_schedule],
        max_grad_norm=cfg.max_grad_norm,
        max_steps=max_steps,
        max_length=cfg.max_seq_len,
        completion_only_loss=True,
        seed=cfg.seed,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        **({"bf16": bf16} if device == "cpu" else {}),  # GPU: TRL's default
    )


def _trl_tokenizer(name: str, config: Any) -> Any:
    """SFTTrainer needs a tokenizer for its pad id; the examples are already token ids."""
    from tuneoff.model import ModelError

    try:
        tokenizer = bench_tokenizer(name)
    except ModelError:  # no tokenizer offline: the embedded one supplies a pad token
        from transformers import AutoTokenizer

        from tuneoff.embedded import TINY_MODEL_DIR

        tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    if config.pad_token_id is not None:
        tokenizer.pad_token = (
            tokenizer.convert_ids_to_tokens(config.pad_token_id) or tokenizer.pad_token
        )
    return tokenizer


def run_worker(spec_path: Path) -> int:
    """Entry of an arm's process: run it and write its result JSON (also on OOM or skip)."""
    spec = json.loads(spec_path.read_text())
    head = {"arm": spec["arm"], "kind": spec["kind"], "method": spec["config"]["method"]}
    try:
        worker = trl_worker if spec["kind"] == "trl" else tuneoff_worker
        result = {"status": "ok", **worker(spec)}
    except torch.OutOfMemoryError as err:
        result = {"status": "oom", "reason": str(err).splitlines()[0]}
        result["memory"] = measure.measure_memory("cuda" if torch.cuda.is_available() else "cpu")
    Path(spec["result"]).write_text(json.dumps({**head, **result}, indent=1) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a worker of tuneoff bench (internal)")
    parser.add_argument("--worker", type=Path, required=True, help="the arm's spec JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)  # as cli.main
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return run_worker(args.worker)


if __name__ == "__main__":
    sys.exit(main())
