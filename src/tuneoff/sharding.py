"""Per-process memory of a run over N processes: DDP, FSDP2 or DeepSpeed ZeRO-1/2/3, as tuneoff
runs them (Accelerate 1.15, DeepSpeed 0.19, torch's AdamW on each process's share).

One process's trace (`plan.predict`) gives activations, logits, evaluation and the step's
temporaries at the same micro-batch; this module replaces what the strategy holds per process:

  ddp    every weight, gradient and optimizer state, as one process, plus the reducer's bucket
         copy of every trainable gradient (Accelerate passes no DDP kwargs: gradient_as_bucket_view
         stays False, so the buckets, 25 MiB each, hold a second copy of all gradients).
  fsdp2  Accelerate's `fsdp2_prepare_model`: every decoder layer, the untied input embedding, the
         tail (final norm, lm head, and the embedding when tied) and the root are `fully_shard`
         units; each parameter is cut along dim 0 (ceil(rows / N) rows per process, padded).
         Under mixed precision Accelerate upcasts trainable weights to fp32 (frozen ones keep
         their dtype), so gradients and AdamW moments are fp32 shards; 4-bit weights are not
         sharded. Gathered (derived): two units at once (the current one and the next,
         prefetched) in MixedPrecisionPolicy's param dtype, the tail kept gathered from forward to
         backward (reshard_after_forward=False), and one unit's unsharded gradients to reduce.
  zero1  DeepSpeed's engine casts the module to bf16/fp16 under mixed precision (else its own
  zero2  dtypes); trainable weights live in one flat buffer padded to a multiple of 2 x N; each
         process keeps the fp32 master of its 1/N partition and AdamW's two fp32 moments of it,
         and before the step the reduced gradients of the parameters that touch its partition,
         whole, in the module's dtype. During backward (derived) one reduce bucket of
         reduce_bucket_size elements (DeepSpeed's default 5e8 when tuneoff's launch gives no
         config file) in the module's dtype, fp32 under ZeRO-1 with mixed precision, which then
         also accumulates every trainable gradient in fp32; at the step, the partition's fp32
         gradient.
  zero3  every parameter is partitioned, ceil(numel / N) elements per process (the weights loaded
         in the half dtype under mixed precision, adapters in theirs); parameters of at most
         stage3_param_persistence_threshold elements (default 1e5) also stay gathered whole; a
         flat gradient partition in the engine's dtype; fp32 masters and moments of the
         partition. Gathered (derived): stage3_prefetch_bucket_size elements (default 5e7) plus
         the largest layer's partitioned parameters; two reduce buckets (overlap_comm is on).

Measured on CPU under 2 gloo processes (tests/test_sharding.py): weights, gradients, fp32 masters,
optimizer states and DDP's buckets, exactly. The gathered and bucket buffers marked derived are
sized from the code above, not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tuneoff.config import Config, ConfigError
from tuneoff.model import Runtime

# plan imports this module inside its functions only: no import cycle
from tuneoff.plan import Prediction, _bytes, _nf4_bytes, _optimizer_bytes, predict
from tuneoff.plan import _params as plan_params

KINDS = ("ddp", "fsdp2", "zero1", "zero2", "zero3")


@dataclass(frozen=True)
class Sharding:
    kind: str
    processes: int
    reduce_bucket_size: int = 500_000_000  # DeepSpeed's defaults: tuneoff's launch has no file
    prefetch_bucket_size: int = 50_000_000
    persistence_threshold: int = 100_000

    def describe(self) -> str:
        what = {
            "ddp": "nothing sharded: every process holds the whole model, plus DDP's gradient "
            "buckets",
            "fsdp2": "FSDP2 shards weights, gradients and optimizer states",
            "zero1": "ZeRO-1 partitions the fp32 masters and optimizer states",
            "zero2": "ZeRO-2 partitions the fp32 masters, optimizer states and gradients",
            "zero3": "ZeRO-3 partitions weights, gradients, fp32 masters and optimizer states",
        }[self.kind]
        return f"per process of {self.processes} ({self.kind}): {what}"


def of_accelerator(accelerator: Any, distributed: str, hidden_size: int) -> Sharding | None:
    """The sharding of a launch (`arm._distributed`'s kind), with the launch's DeepSpeed bucket
    sizes: a config file's numbers, its "auto" ones as Accelerate fills them (from the hidden
    size), else DeepSpeed's defaults. None for one process or the unwrapped base arm."""
    kind = distributed.replace("deepspeed-", "")
    if kind not in KINDS:
        return None
    sizes = {}
    if kind.startswith("zero"):
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        auto = {"reduce_bucket_size": hidden_size**2,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size**2),
                "stage3_param_persistence_threshold": 10 * hidden_size}  # fmt: skip
        fields = {"reduce_bucket_size": "reduce_bucket_size",
                  "stage3_prefetch_bucket_size": "prefetch_bucket_size",
                  "stage3_param_persistence_threshold": "persistence_threshold"}  # fmt: skip
        for key, field in fields.items():
            if key in zero:
                sizes[field] = auto[key] if zero[key] == "auto" else int(float(zero[key]))
    return Sharding(kind, accelerator.num_processes, **sizes)


def allows(cfg: Config, sharding: Sharding | None) -> bool:
    """Whether tuneoff runs `cfg` under `sharding` (the advice ladder skips what it refuses)."""
    try:
        check_sharding(cfg, sharding) if sharding is not None else None
    except ConfigError:
        return False
    return True


def check_sharding(cfg: Config, sharding: Sharding) -> None:
    """The combinations tuneoff refuses to launch (`runs.check_launch`) are refused here too."""
    if sharding.kind.startswith("zero") and cfg.optimizer != "adamw":
        raise ConfigError(f"optimizer={cfg.optimizer} does not run under DeepSpeed: use adamw")
    if sharding.kind == "zero3" and cfg.method == "qlora":
        raise ConfigError("qlora does not run under ZeRO-3: plan --sharding zero2 or fsdp2")
    if sharding.kind == "fsdp2" and cfg.optimizer == "adamw8bit":
        raise ConfigError("optimizer=adamw8bit does not run under FSDP2: use adamw or adamw_lean")


def _half(runtime: Runtime) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(runtime.precision)


def _params(arch_config: Any, cfg: Config, runtime: Runtime) -> tuple[list[dict], int, int]:
    """Each parameter of the prepared model (name, shape, numel, one-process dtype, trainable,
    4-bit, unit: the fully_shard unit it belongs to), its buffers' bytes, and hidden size."""
    from tuneoff.trace import meta_model

    traced = cfg.replace(method="lora" if cfg.method == "qlora" else cfg.method)
    model = meta_model(arch_config, traced)
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    units = {}
    for name, module in model.named_modules():
        if type(module).__name__ in layer_classes:
            for pname, _ in module.named_parameters():
                units[f"{name}.{pname}"] = name
    listed, buffers = plan_params(arch_config, cfg, runtime)
    shapes = dict(model.named_parameters())
    out = []
    for name, numel, dtype, trainable, quantized in listed:
        unit = units.get(name, "tail" if "norm" in name or "lm_head" in name else "root")
        if "embed_tokens" in name:
            unit = "tail" if model.get_input_embeddings().weight is (
                getattr(model.get_output_embeddings(), "weight", None)
            ) else "embed"  # fmt: skip
        out.append(
            {"name": name, "shape": tuple(shapes[name].shape), "numel": numel, "dtype": dtype,
             "trainable": trainable, "quantized": quantized, "unit": unit}
        )  # fmt: skip
    return out, buffers, getattr(arch_config, "hidden_size", 0)


def _fsdp2(params: list[dict], n: int, cfg: Config, runtime: Runtime) -> dict[str, int]:
    half = _half(runtime)
    weights = grads = optimizer = 0
    gathered: dict[str, int] = {}
    reduce: dict[str, int] = {}
    for p in params:
        if p["quantized"]:  # excluded from sharding (ignored_params): whole on every process
            weights += _nf4_bytes(p["numel"])
            continue
        dtype = torch.float32 if p["trainable"] and half else p["dtype"]  # Accelerate upcasts
        rows = p["shape"][0] if p["shape"] else 1
        local = math.ceil(rows / n) * (p["numel"] // max(rows, 1))
        weights += local * _bytes(dtype)
        compute = half or dtype  # MixedPrecisionPolicy(param_dtype=...) when mixed precision
        gathered[p["unit"]] = gathered.get(p["unit"], 0) + p["numel"] * _bytes(compute)
        if p["trainable"]:
            grads += local * _bytes(dtype)
            optimizer += _optimizer_bytes(local, dtype, cfg.optimizer)
            reduce[p["unit"]] = reduce.get(p["unit"], 0) + p["numel"] * _bytes(compute)
    tail = gathered.pop("tail", 0)
    units = list(gathered.values())  # in forward order: each unit with the next, prefetched
    pairs = max((a + b for a, b in zip(units, units[1:], strict=False)), default=sum(units))
    return {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "master_weights": 0,
        "gathered": pairs + tail,  # current + prefetched unit, and the tail kept gathered
        "backward_buffers": max(reduce.values(), default=0),
        "step_buffers": 0,
    }


def _zero12(params: list[dict], n: int, stage: int, runtime: Runtime, bucket: int):
    half = _half(runtime)
    weights = 0
    trainable = []
    for p in params:
        dtype = half or p["dtype"]  # the engine casts the module to bf16/fp16
        if p["quantized"]:
            weights += _nf4_bytes(p["numel"])
        elif p["trainable"]:
            trainable.append(p["numel"])
        else:
            weights += p["numel"] * _bytes(dtype)
    module = half or torch.float32  # trainable weights: fp32 unless mixed precision
    total = sum(trainable)
    aligned = math.ceil(total / (2 * n)) * 2 * n  # nccl_start_alignment_factor 2 x N
    part = aligned // n
    weights += aligned * _bytes(module)
    # Before the step each process holds the reduced gradients of every parameter that touches
    # its partition, whole: the largest such set over the processes.
    starts = [0]
    for numel in trainable:
        starts.append(starts[-1] + numel)
    touching = max(
        sum(
            numel
            for numel, start in zip(trainable, starts, strict=False)
            if start < (r + 1) * part and start + numel > r * part
        )
        for r in range(n)
    )
    reduce_dtype = torch.float32 if stage == 1 and half else module
    accumulate = 4 * total if stage == 1 and half else 0  # ZeRO-1's fp32 grad_accum per param
    return {
        "weights": weights,
        "gradients": touching * _bytes(module),
        "optimizer": 2 * 4 * part,
        "master_weights": 4 * part,
        "gathered": 0,
        "backward_buffers": bucket * _bytes(reduce_dtype) + accumulate,
        "step_buffers": 4 * part,  # the partition's gradient in fp32, made for the step
    }


def _zero3(params: list[dict], n: int, runtime: Runtime, sharding: Sharding) -> dict[str, int]:
    half = _half(runtime)
    weights = part = 0
    layers: dict[str, int] = {}
    for p in params:
        dtype = p["dtype"] if "lora_" in p["name"] else (half or p["dtype"])
        local = math.ceil(p["numel"] / n)
        weights += local * _bytes(dtype)
        if p["numel"] <= sharding.persistence_threshold:
            weights += p["numel"] * _bytes(dtype)  # persistent: also kept gathered
        else:
            layers[p["unit"]] = layers.get(p["unit"], 0) + p["numel"] * _bytes(dtype)
        if p["trainable"]:
            part += local
    engine = half or torch.float32
    prefetch = sharding.prefetch_bucket_size * _bytes(engine)
    return {
        "weights": weights,
        "gradients": part * _bytes(engine),
        "optimizer": 2 * 4 * part,
        "master_weights": 4 * part,
        "gathered": prefetch + max(layers.values(), default=0),
        "backward_buffers": 2 * sharding.reduce_bucket_size * _bytes(engine),
        "step_buffers": 0,
    }


def predict_sharded(
    cfg: Config,
    arch_config: Any,
    runtime: Runtime,
    sharding: Sharding,
    both_checkpointing: bool = True,
):
    """`plan.predict`'s per-process prediction for `cfg` trained over `sharding.processes`
    processes: what one process holds by component, and its three phases."""
    check_sharding(cfg, sharding)
    one = predict(cfg, arch_config, runtime, both_checkpointing)
    params, buffers, _ = _params(arch_config, cfg, runtime)
    n, kind = sharding.processes, sharding.kind
    if kind == "ddp":
        held = {k: one.components[k] for k in ("weights", "gradients", "optimizer")}
        held.update(master_weights=0, gathered=0, step_buffers=0,
                    backward_buffers=held["gradients"])  # fmt: skip
    elif kind == "fsdp2":
        held = _fsdp2(params, n, cfg, runtime)
    elif kind == "zero3":
        held = _zero3(params, n, runtime, sharding)
    else:
        held = _zero12(params, n, int(kind[-1]), runtime, sharding.reduce_bucket_size)
    if kind != "ddp":
        held["weights"] += buffers
    comps = dict(one.components)
    comps.update({k: held[k] for k in ("weights", "gradients", "optimizer", "master_weights")})
    if kind in ("fsdp2", "zero1", "zero2", "zero3") and _half(runtime):
        comps["autocast_copies"] = 0  # weights computed with are already in the half dtype
    persistent = held["weights"] + held["master_weights"] + held["optimizer"]
    # DDP's buckets live as long as the model: every phase holds them.
    always = held["backward_buffers"] if kind == "ddp" else 0
    # ZeRO keeps gradient partitions across the window; DDP and FSDP2 their .grad from the first
    # backward of a window on (with accumulation).
    grads_held = held["gradients"] if kind.startswith("zero") or cfg.grad_accum > 1 else 0
    backward = 0 if kind == "ddp" else held["backward_buffers"]
    comps["communication"] = max(held["gathered"] + backward, held["step_buffers"]) + always
    phases = {
        "forward_backward": persistent + always + grads_held + comps["activations"]
        + comps["logits_and_loss"] + comps["autocast_copies"] + held["gathered"] + backward,
        "optimizer_step": persistent + always + held["gradients"] + comps["step_temporaries"]
        + held["step_buffers"],
        "evaluation": persistent + always + held["gathered"] + comps["evaluation"],
    }  # fmt: skip
    settings = {**one.settings, "processes": n, "sharding": kind, "sharded": sharding.describe()}
    return Prediction(cfg.method, settings, comps, phases, one.activations_by_checkpointing)


def predict_for(
    cfg: Config,
    arch_config: Any,
    runtime: Runtime,
    sharding: Sharding | None,
    both_checkpointing: bool = True,
):
    """One process's prediction (`plan.predict`), or per process under `sharding`."""
    if sharding is None:
        return predict(cfg, arch_config, runtime, both_checkpointing)
    return predict_sharded(cfg, arch_config, runtime, sharding, both_checkpointing)


def parse_sharding(processes: str | int | None, kind: str | None) -> Sharding | None:
    """--processes and --sharding: None for one process; N > 1 without --sharding is DDP."""
    try:
        n = int(processes) if processes is not None else 1
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--processes {processes}: give a whole number of processes, 1 or more")
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--sharding {kind}: choose one of {', '.join(KINDS)}")
    if n == 1:
        if kind not in (None, "ddp"):
            raise ConfigError(f"--sharding {kind} needs --processes 2 or more")
        return None
    return Sharding(kind or "ddp", n)
