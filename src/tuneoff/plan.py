"""Memory planning: an arm's peak training memory, predicted before it runs, by component.

The prediction traces the arm's real training step on the meta device (`trace.py`: tuneoff's
`prepare_model`, loss and backward on tensors with shapes and dtypes but no storage, their live
bytes counted by `measure.TensorMemory`), so activations, logits and the loss are counted from
the actual computation of the actual architecture, with or without gradient checkpointing, not
from a rule of thumb. What the meta device cannot run is added here by formula: parameters,
gradients and optimizer states by dtype, 4-bit weights (QLoRA), 8-bit optimizer states,
autocast's copies of the weights (listed apart) and the optimizer step's temporaries.

Peak allocated is the largest of three phases:
  forward/backward = weights + optimizer states + gradients (held across an accumulation
                     window) + activations + logits and loss + autocast weight copies
  optimizer step   = weights + optimizer states + gradients + the step's temporaries
  evaluation       = weights + optimizer states + one evaluation batch's forward
Reserved adds the caching allocator's slack; a GPU also needs the CUDA context beside it.
`measure.measure` checks a prediction against real steps; per process of N: `sharding.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneoff.config import Config
from tuneoff.model import Runtime, weights_dtype
from tuneoff.report import _num, _table  # plan tables print as the report's do
from tuneoff.trace import meta_model, trace_cfg, trace_eval, trace_train

GIB = 2**30
CUDA_CONTEXT = int(0.5 * GIB)  # driver, kernels and cuBLAS handles: outside torch's allocator
RESERVED_SLACK = 0.05  # allocator slack over the allocated peak, with expandable segments
COMPONENTS = (
    "weights",
    "gradients",
    "optimizer",
    "activations",
    "logits_and_loss",
    "autocast_copies",
    "step_temporaries",
    "evaluation",
)


@dataclass
class Prediction:
    method: str
    settings: dict[str, Any]
    components: dict[str, int]  # bytes
    phases: dict[str, int]  # bytes: forward_backward, optimizer_step, evaluation
    activations_by_checkpointing: dict[str, int] = field(default_factory=dict)

    @property
    def peak_allocated(self) -> int:
        return max(self.phases.values())

    @property
    def peak_reserved(self) -> int:
        return int(self.peak_allocated * (1 + RESERVED_SLACK))

    @property
    def device_total(self) -> int:
        """What the GPU must hold: reserved memory plus the CUDA context."""
        return self.peak_reserved + CUDA_CONTEXT

    def to_dict(self) -> dict[str, Any]:
        gib = {k: v / GIB for k, v in self.components.items()}
        return {
            "method": self.method,
            "settings": self.settings,
            "components_gib": gib,
            "phases_gib": {k: v / GIB for k, v in self.phases.items()},
            "activations_gib_by_checkpointing": {
                k: v / GIB for k, v in self.activations_by_checkpointing.items()
            },
            "peak_allocated_gib": self.peak_allocated / GIB,
            "peak_reserved_gib": self.peak_reserved / GIB,
            "device_total_gib": self.device_total / GIB,
        }


# --------------------------------------------------------------------------- formulas


def _params(arch_config, cfg: Config, runtime: Runtime):
    """(name, numel, dtype, trainable, is_quantized_linear) of the prepared model's params, and
    the bytes of its buffers (floating ones take the weights' dtype, as `model.to` does)."""
    traced = cfg.replace(method="lora" if cfg.method == "qlora" else cfg.method)
    model = meta_model(arch_config, traced)
    real = weights_dtype(cfg, runtime)
    head = model.get_output_embeddings()
    linear_weights = {
        id(m.weight)
        for m in model.modules()
        if type(m) is torch.nn.Linear and m is not head and m.weight.shape[0] > 0
    }
    out = []
    for name, p in model.named_parameters():
        dtype = torch.float32 if p.requires_grad and cfg.method != "full" else real
        quantized = cfg.method == "qlora" and id(p) in linear_weights and not p.requires_grad
        out.append((name, p.numel(), dtype, p.requires_grad, quantized))
    buffers = sum(
        b.numel() * (_bytes(real) if b.is_floating_point() else b.element_size())
        for b in model.buffers()
    )
    return out, buffers


def _nf4_bytes(numel: int) -> int:
    """NF4 with double quantization: 4 bits per weight, an 8-bit scale per 64 weights, an
    fp32 scale per 256 scales, and each layer's two code books (16 + 256 fp32 values)."""
    return numel // 2 + math.ceil(numel / 64) + 4 * math.ceil(numel / 64 / 256) + 1088


def _optimizer_bytes(numel: int, dtype: torch.dtype, optimizer: str) -> int:
    if optimizer == "adamw_lean":
        return 4 * numel
    if optimizer == "adamw8bit" and numel >= 4096:  # bitsandbytes keeps small tensors 32-bit
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)
    return 2 * numel * _bytes(dtype)  # torch AdamW keeps its moments in the weights' dtype


def _bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _autocast_copies(params, cfg: Config, runtime: Runtime, act_dtype: torch.dtype) -> int:
    """Weights in another dtype than fp16/bf16 autocast's (fp32, or bf16 under fp16): each linear
    layer's weight is cast on use, and the cast is kept for backward (frozen weights: per use;
    trainable: cached per forward). The lm head's cast is kept only with full-vocab logits (the
    chunked loss casts it for its own duration); an embedding lookup is not cast."""
    if act_dtype == torch.float32 or cfg.method == "qlora":
        return 0
    untied_head = any("lm_head" in name for name, *_ in params)
    total = 0
    for name, numel, dtype, _, _ in params:
        if dtype == act_dtype or not name.endswith("weight") or "norm" in name:
            continue
        head = "lm_head" in name or ("embed_tokens" in name and not untied_head)
        if head and cfg.loss_chunk_size:
            continue
        if head or ("embed_tokens" not in name and "lora_" not in name):
            total += numel * _bytes(act_dtype)
    return total


def _step_temporaries(params, cfg: Config, runtime: Runtime) -> int:
    trainable = [(n, d) for _, n, d, t, _ in params if t]
    if not trainable:
        return 0
    if cfg.optimizer == "adamw_lean":
        from tuneoff.optim import LEAN_SLICE

        return 5 * 4 * min(LEAN_SLICE, max(n for n, _ in trainable))
    if cfg.optimizer == "adamw" and runtime.device == "cuda" and not cfg.fused_optimizer:
        return sum(n * _bytes(d) for n, d in trainable)  # foreach: one param-sized buffer
    return 0


# --------------------------------------------------------------------------- prediction


def predict(
    cfg: Config, arch_config: Any, runtime: Runtime, both_checkpointing: bool = True
) -> Prediction:
    """Peak memory of training `cfg.method` with `cfg`'s settings on `runtime`;
    `both_checkpointing` also traces the activations of the other checkpointing setting."""
    params, buffers = _params(arch_config, cfg, runtime)
    _, act_dtype = trace_cfg(cfg, runtime)
    weights = buffers + sum(_nf4_bytes(n) if q else n * _bytes(d) for _, n, d, _, q in params)
    training = cfg.method != "base"
    gradients = sum(n * _bytes(d) for _, n, d, t, _ in params if t)
    optimizer = sum(_optimizer_bytes(n, d, cfg.optimizer) for _, n, d, t, _ in params if t)
    acts: dict[bool, int] = {}
    activations = logits = 0
    if training:
        checkpointing = (False, True) if both_checkpointing else (cfg.gradient_checkpointing,)
        traced = {}
        for ckpt in checkpointing:
            ckpt_cfg = cfg.replace(gradient_checkpointing=ckpt)
            traced[ckpt] = trace_train(arch_config, ckpt_cfg, runtime, with_loss=False)
            acts[ckpt] = traced[ckpt]
        activations = acts[cfg.gradient_checkpointing]
        with_loss = trace_train(arch_config, cfg, runtime, with_loss=True)
        logits = max(0, with_loss - traced[cfg.gradient_checkpointing])
    components = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logits_and_loss": logits,
        "autocast_copies": _autocast_copies(params, cfg, runtime, act_dtype) if training else 0,
        "step_temporaries": _step_temporaries(params, cfg, runtime),
        "evaluation": trace_eval(arch_config, cfg, runtime),
    }
    held = gradients if cfg.grad_accum > 1 else 0
    phases = {
        "forward_backward": weights
        + optimizer
        + held
        + activations
        + logits
        + components["autocast_copies"],
        "optimizer_step": weights + optimizer + gradients + components["step_temporaries"],
        "evaluation": weights + optimizer + components["evaluation"],
    }
    return Prediction(
        cfg.method,
        settings_of(cfg, runtime),
        components,
        phases,
        {"off": acts.get(False, 0), "on": acts.get(True, 0)},
    )


def settings_of(cfg: Config, runtime: Runtime) -> dict[str, Any]:
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return {
        "device": runtime.device,
        "precision": runtime.precision,
        "weights_dtype": dtype[weights_dtype(cfg, runtime)],
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "loss_chunk_size": cfg.loss_chunk_size,
        "optimizer": cfg.optimizer,
        "batching": cfg.batching,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "micro_batch_tokens": cfg.micro_batch_tokens,
        "max_seq_len": cfg.max_seq_len,
        "eval_batch_size": cfg.eval_batch_size,
    }


# --------------------------------------------------------------------------- advice


def planning_runtime(cfg: Config) -> Runtime:
    """The runtime a plan is for: this machine's choice when it has CUDA (or `device=cpu` was
    asked), else a GPU with the configured precision (auto: bf16)."""
    from tuneoff.model import choose_runtime

    if cfg.device == "cpu" or torch.cuda.is_available():
        return choose_runtime(cfg)
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    return Runtime("cuda", precision, f"planned for a GPU with {precision} autocast")


def _ladder(cfg: Config, runtime: Runtime, pred: Prediction) -> list[tuple[dict, str]]:
    """Changes that lower memory, cheapest first, applicable to `cfg` now."""
    steps: list[tuple[dict, str]] = []
    half = runtime.precision if runtime.precision in ("bf16", "fp16") else "bf16"
    if cfg.loss_chunk_size == 0:
        steps.append(({"loss_chunk_size": 512}, "none: faster (no lm-head work on prompts)"))
    if not cfg.lean_activations and cfg.method != "base":
        steps.append(({"lean_activations": True}, "about 3% more time per step (CPU, measured)"))
    if pred.phases["evaluation"] == pred.peak_allocated and cfg.eval_batch_size > 1:
        steps.append(({"eval_batch_size": cfg.eval_batch_size // 2}, "slower evaluation only"))
    frozen = pred.settings["weights_dtype"] == "fp32"
    if cfg.method in ("lora", "qlora") and frozen and runtime.device == "cuda":
        steps.append(({"weights_dtype": half}, f"none: frozen weights in {half}, faster"))
    if cfg.method == "full" and runtime.device == "cuda" and runtime.precision == "fp16":
        steps.append(({"precision": "bf16"}, "none on GPUs with bf16 (Ampere or newer)"))
    if cfg.method == "full" and cfg.optimizer == "adamw":
        steps.append(({"optimizer": "adamw_lean"}, "optimizer step unfused; bf16 moments"))
    if cfg.method == "full" and frozen and cfg.optimizer == "adamw_lean":
        steps.append(({"weights_dtype": "bf16"}, "bf16 weights with stochastic rounding"))
    if not cfg.gradient_checkpointing:
        steps.append(({"gradient_checkpointing": True}, "about 30% more compute per step"))
    if cfg.micro_batch_tokens >= 2 * cfg.max_seq_len:
        change = {"micro_batch_tokens": cfg.micro_batch_tokens // 2}
        steps.append((change, "same effective batch; smaller micro-batches, lower throughput"))
    elif cfg.batch_size > 1 and not cfg.micro_batch_tokens:
        change = {"batch_size": cfg.batch_size // 2, "grad_accum": cfg.grad_accum * 2}
        steps.append((change, "same effective batch; smaller micro-batches, lower throughput"))
    return steps


def advise(
    cfg: Config,
    arch_config: Any,
    runtime: Runtime,
    limit: int,
    pred: Prediction | None = None,
    sharding: Any = None,
) -> dict[str, Any]:
    """The cheapest changes, in order, after which the arm fits in `limit` bytes (reserved
    memory plus the CUDA context on a GPU), and the prediction for them (per process under
    `sharding.Sharding`)."""
    from tuneoff.sharding import allows, predict_for

    pred = pred or predict_for(cfg, arch_config, runtime, sharding, both_checkpointing=False)
    changes: list[dict[str, Any]] = []
    while _needs(pred, runtime) > limit:
        steps = [s for s in _ladder(cfg, runtime, pred) if allows(cfg.replace(**s[0]), sharding)]
        if not steps:
            break
        change, cost = steps[0]
        cfg = cfg.replace(**change)
        if "precision" in change:
            runtime = planning_runtime(cfg)
        pred = predict_for(cfg, arch_config, runtime, sharding, both_checkpointing=False)
        changes.append({"set": change, "cost": cost, "peak_gib": _needs(pred, runtime) / GIB})
    return {
        "fits": _needs(pred, runtime) <= limit,
        "changes": changes,
        "overrides": " ".join(f"{k}={_yaml(v)}" for k, v in _merged(changes).items()),
        "prediction": pred.to_dict(),
    }


def _merged(changes: list[dict[str, Any]]) -> dict[str, Any]:
    """The settings of all changes, later ones winning (batch_size halved twice: the last)."""
    out: dict[str, Any] = {}
    for change in changes:
        out.update(change["set"])
    return out


def _needs(pred: Prediction, runtime: Runtime) -> int:
    return pred.device_total if runtime.device == "cuda" else pred.peak_allocated


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def plan_config(
    preset: str | None,
    config: str | None,
    overrides: list[str],
    model: str | None,
    methods: str | None,
) -> Config:
    """`tuneoff plan`'s config: without --preset or --config, the seed preset (the reference's
    model and recipe, fp16 autocast)."""
    from tuneoff.config import parse_overrides, resolve

    values = parse_overrides(overrides)
    if model:
        values["model"] = model
    if methods is not None:  # "" is an error, not the default arms
        values["methods"] = methods
    cfg, _ = resolve(preset or (None if config else "seed"), config, values)
    return cfg


def gpu_memory_limit(gpu_memory: str | None) -> int | None:
    """--gpu-memory in bytes; without it, this GPU's memory (None on a machine without one)."""
    from tuneoff.config import parse_size

    limit = parse_size(gpu_memory, "--gpu-memory") if gpu_memory else None
    if limit is None and torch.cuda.is_available():
        limit = torch.cuda.get_device_properties(0).total_memory
    return limit


def plan_arms(
    cfg: Config, methods: list[str], limit: int | None, arch_config: Any = None, sharding=None
) -> dict[str, Any]:
    """Prediction, verdict and advice for each method: what `tuneoff plan` prints; per process
    under `sharding.Sharding` (None: one process holding the whole model)."""
    from tuneoff.model import load_arch_config
    from tuneoff.sharding import predict_for

    arch_config = arch_config or load_arch_config(cfg.model)
    runtime = planning_runtime(cfg)
    arms = {}
    for method in methods:
        arm_cfg = cfg.replace(method=method)
        pred = predict_for(arm_cfg, arch_config, runtime, sharding)
        arm = {"prediction": pred.to_dict(), "needs_gib": _needs(pred, runtime) / GIB}
        if limit is not None:
            arm["fits"] = _needs(pred, runtime) <= limit
            if not arm["fits"]:
                arm["advice"] = advise(arm_cfg, arch_config, runtime, limit, pred, sharding)
        arms[method] = arm
    result = {
        "model": cfg.model,
        "parameters": _param_count(arch_config),
        "runtime": {
            "device": runtime.device,
            "precision": runtime.precision,
            "reason": runtime.reason,
        },
        "limit_gib": limit / GIB if limit is not None else None,
        "cuda_context_gib": CUDA_CONTEXT / GIB if runtime.device == "cuda" else 0.0,
        "arms": arms,
    }
    if sharding is not None:
        result["sharding"] = {"kind": sharding.kind, "processes": sharding.processes,
                              "sharded": sharding.describe()}  # fmt: skip
    return result


def _param_count(arch_config: Any) -> int:
    model = meta_model(arch_config, Config(method="base"))
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- tuneoff plan

PLAN_ROWS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer states"),
    ("activations", "activations"),
    ("logits_and_loss", "logits and loss"),
    ("autocast_copies", "autocast weight copies"),
    ("step_temporaries", "optimizer-step temporaries"),
    ("evaluation", "evaluation batch"),
)
SHARDED_ROWS = (("master_weights", "fp32 master weights"), ("communication", "gathered/buckets"))


def format_plan(result: dict[str, Any]) -> str:
    """The text `tuneoff plan` prints: per arm, components in GiB, peaks, verdict, advice."""
    arms = result["arms"]
    names = list(arms)
    rt = result["runtime"]
    head = (
        f"tuneoff plan: {result['model']} ({result['parameters']:,} parameters), "
        f"{rt['device']} {rt['precision']} ({rt['reason']})"
    )
    first = arms[names[0]]["prediction"]["settings"]
    micro = (
        f"micro-batch {first['batch_size']} x {first['max_seq_len']} tokens "
        f"({first['batching']}), accumulation {first['grad_accum']}"
    )
    if first.get("micro_batch_tokens"):
        step = first["batch_size"] * first["grad_accum"]
        micro = (
            f"micro-batches of at most {first['micro_batch_tokens']:,} tokens "
            f"({first['batching']}), {step} examples per optimizer step"
        )
    head += f"\n{micro}, eval batch {first['eval_batch_size']}; every value in GiB"
    if "sharding" in result:
        head += f"\n{result['sharding']['sharded']}"
    rows = []
    for key, label in PLAN_ROWS + (SHARDED_ROWS if "sharding" in result else ()):
        rows.append(
            [label] + [_num(arms[m]["prediction"]["components_gib"][key], 2) for m in names]
        )
    ckpt = [arms[m]["prediction"]["activations_gib_by_checkpointing"] for m in names]
    rows.append(["  activations, checkpointing off"] + [_num(c.get("off"), 2) for c in ckpt])
    rows.append(["  activations, checkpointing on"] + [_num(c.get("on"), 2) for c in ckpt])
    rows.append(
        ["peak allocated"] + [_num(arms[m]["prediction"]["peak_allocated_gib"], 2) for m in names]
    )
    rows.append(
        ["peak reserved"] + [_num(arms[m]["prediction"]["peak_reserved_gib"], 2) for m in names]
    )
    if result["cuda_context_gib"]:
        rows.append(["+ CUDA context"] + [_num(result["cuda_context_gib"], 2)] * len(names))
    rows.append(["needs"] + [_num(arms[m]["needs_gib"], 2) for m in names])
    if result["limit_gib"] is not None:
        rows.append(
            [f"fits {result['limit_gib']:.1f} GiB"]
            + ["yes" if arms[m]["fits"] else "NO" for m in names]
        )
    lines = [head, "", _table(["", *names], rows)]
    for m in names:
        advice = arms[m].get("advice")
        if not advice:
            continue
        if not advice["changes"]:
            lines.append(f"\n{m}: nothing tuneoff can set makes it fit")
            continue
        verdict = "fits" if advice["fits"] else "still does not fit"
        last = advice["changes"][-1]["peak_gib"]
        lines.append(f"\n{m} {verdict} with: {advice['overrides']}  (needs {last:.2f} GiB)")
        for change in advice["changes"]:
            setting = " ".join(f"{k}={str(v).lower()}" for k, v in change["set"].items())
            lines.append(
                f"  {setting:<40} -> {change['peak_gib']:6.2f} GiB; cost: {change['cost']}"
            )
    if "measured" in result:
        lines.append("\n" + format_measured(result["measured"]))
    return "\n".join(lines)


def format_measured(measured: dict[str, Any]) -> str:
    """Predicted vs measured per component (`tuneoff plan --measure`)."""
    rt = measured["runtime"]
    lines = [f"predicted vs measured with random weights on {rt['device']} ({rt['precision']})"]
    for method, arm in measured.items():
        if method == "runtime":
            continue
        rows = []
        for key, value in arm["measured_gib"].items():
            pred = arm["predicted_gib"].get(key)
            ratio = f"{pred / value:.3f}" if pred is not None and value else "-"
            rows.append([key, _num(pred, 4), _num(value, 4), ratio])
        lines += ["", f"{method}:", _table(["", "predicted GiB", "measured GiB", "ratio"], rows)]
    return "\n".join(lines)
