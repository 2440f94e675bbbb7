"""Memory planning: an arm's peak training memory, predicted before it runs, by component.

The prediction runs the arm's real training step (tuneoff's `prepare_model`, loss and
optimizer) on the meta device, where tensors have shapes and dtypes but no storage, under
torch's `MemTracker`, which counts every tensor's bytes by category (parameters, gradients,
optimizer states, activations, temporaries) at the peak. So activations, logits and the loss
are counted from the actual computation of the actual architecture, with or without gradient
checkpointing, not from a rule of thumb. The meta device has no autocast: the trace makes
autocast's casts itself (`_AutocastOnMeta`: matrix products in the autocast dtype, the rest in
the weights' dtype), so fp32 weights keep an fp32 residual stream and a half-precision copy of
each linear layer's input, as in the real run. What the meta device cannot run is added by
formula: 4-bit weights (QLoRA), 8-bit optimizer states, autocast's copies of the weights (listed
apart), and attention, which on the meta device is traced as a flash kernel (saves q, k, v,
output and log-sum-exp, as CUDA's flash and memory-efficient kernels and CPU's flash kernel do).

Peak allocated is the largest of three phases:
  forward/backward = weights + optimizer states + gradients (held across an accumulation
                     window) + activations + logits and loss + autocast weight copies
  optimizer step   = weights + optimizer states + gradients + the step's temporaries
  evaluation       = weights + optimizer states + one evaluation batch's forward
Reserved adds the caching allocator's slack; a GPU also needs the CUDA context beside it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneoff import attention, loss
from tuneoff.config import Config
from tuneoff.model import Runtime, prepare_model, weights_dtype

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


# --------------------------------------------------------------------------- tracing


class _MetaFlashAttention(torch.autograd.Function):
    """Shapes and saved tensors of a flash attention kernel, for tracing on the meta device
    (where torch would otherwise trace the math kernel and its T x T attention matrix)."""

    @staticmethod
    def forward(ctx, q, k, v, out_dtype=None):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],), dtype=out_dtype or q.dtype)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


def _meta_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    half = loss.META_AUTOCAST
    if half is not None:  # sdpa is on autocast's list: q, k and v in the autocast dtype
        q, k, v = (t.to(half) if t.dtype == torch.float32 else t for t in (q, k, v))
    return _MetaFlashAttention.apply(q, k, v)


def _meta_sdpa_fp32(q, k, v, *args, **kwargs):
    """What attention.py runs for packed rows on CPU under bf16: fp32 copies in (alive during
    the call), fp32 out cast to bf16; autograd keeps the inputs in their own dtype unless
    another saved-tensor hook is active (`attention._saved_narrow`). Under autocast, fp32
    inputs (query and key of fp32 weights) are first rounded to its dtype, as sdpa's are."""
    half = loss.META_AUTOCAST
    if half is not None:
        q, k, v = (t.to(half) if t.dtype == torch.float32 else t for t in (q, k, v))
    wide = [t.float() for t in (q, k, v)]
    if attention.saves_narrow():
        out = _MetaFlashAttention.apply(q, k, v, torch.float32)
    else:
        out = _MetaFlashAttention.apply(*wide)
    del wide
    return out.to(v.dtype)


class _AutocastOnMeta(torch.overrides.TorchFunctionMode):
    """fp16/bf16 autocast's casts, traced on the meta device (which has no autocast): the
    inputs of matrix products are cast to the autocast dtype, everything else keeps its dtype,
    as autocast does on CUDA and CPU. So with fp32 weights the residual stream stays fp32 and
    every linear layer keeps its own half-precision copy of its input, as in the real run.
    Casts of weights are made outside `memory`'s count: the plan lists them apart (`autocast
    weight copies`). One instance per forward pass: autocast caches a trainable weight's cast
    for the pass, and casts a frozen weight at each use."""

    PRODUCTS = frozenset(
        [
            torch.nn.functional.linear,
            torch.matmul,
            torch.mm,
            torch.bmm,
            torch.addmm,
            torch.baddbmm,
            torch.Tensor.matmul,
            torch.Tensor.__matmul__,
            torch.Tensor.mm,
            torch.Tensor.bmm,
        ]
    )

    def __init__(self, dtype: torch.dtype, memory: Any, weights: set[int]) -> None:
        super().__init__()
        self.dtype, self.memory, self.weights = dtype, memory, weights
        self.cache: dict[int, torch.Tensor] = {}

    def __enter__(self):
        loss.META_AUTOCAST = self.dtype  # lean, lora_layers, loss read the compute dtype
        return super().__enter__()

    def __exit__(self, *exc):
        loss.META_AUTOCAST = None
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.PRODUCTS:
            cast = torch.utils._pytree.tree_map_only
            args, kwargs = cast(torch.Tensor, self._cast, (args, kwargs))
        return func(*args, **kwargs)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32:
            return t
        if id(t) not in self.weights:
            return t.to(self.dtype)
        if t.requires_grad and id(t) in self.cache:
            return self.cache[id(t)]
        with self.memory.untracked():
            cast = t.to(self.dtype)
        if t.requires_grad:
            self.cache[id(t)] = cast
        return cast


def _forward_backward_as_run(model, batches, with_loss, chunk, act_dtype, memory) -> None:
    """`_forward_backward`, under autocast's casts when the run has autocast."""
    if act_dtype == torch.float32:
        _forward_backward(model, batches, with_loss, chunk)
        return
    from tuneoff.loss import forward_loss

    weights = {id(p) for p in model.parameters()}
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if checkpointing is None:
        checkpointing = model.is_gradient_checkpointing
    if checkpointing:  # recomputed under autocast too, as torch.utils.checkpoint does
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={
                "use_reentrant": False,
                "context_fn": lambda: (
                    contextlib.nullcontext(),
                    _AutocastOnMeta(act_dtype, memory, weights),
                ),
            }
        )
    for batch in batches:
        with _AutocastOnMeta(act_dtype, memory, weights):
            out = forward_loss(model, batch, chunk) if with_loss else _hidden_sum(model, batch)
        out.backward()


@contextlib.contextmanager
def _flash_on_meta(fp32_attention: bool = False):
    """Flash-style attention, and a causal mask that transformers need not inspect (it reads
    mask values to choose, which the meta device cannot). Real runs add a boolean mask for
    padded or packed batches: batch x seq^2 bytes, left out."""
    import torch.nn.functional as F
    from transformers import masking_utils

    patches = [
        (F, "scaled_dot_product_attention", _meta_sdpa_fp32 if fp32_attention else _meta_sdpa),
        (masking_utils, "find_packed_sequence_indices", lambda *a, **k: None),
        (masking_utils, "_ignore_causal_mask_sdpa", lambda *a, **k: True),
    ]
    from torch.fx.experimental import _config as fx_config

    if hasattr(fx_config, "meta_nonzero_assume_all_nonzero"):  # boolean masks: all true
        patches.append((fx_config, "meta_nonzero_assume_all_nonzero", True))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def trace_batch(cfg: Config, device: str, eval_batch: bool = False) -> dict[str, torch.Tensor]:
    """The largest micro-batch the arm can see: every sequence at max_seq_len and every
    position supervised (peak memory is set by the worst batch). Packed training batches: one
    row, with the position ids that tell varlen attention where each example starts
    (evaluation batches are always padded)."""
    rows = cfg.eval_batch_size if eval_batch else cfg.batch_size
    if cfg.batching != "packed" or eval_batch:
        ids = torch.zeros((rows, cfg.max_seq_len), dtype=torch.long, device=device)
        return {"input_ids": ids, "labels": ids.clone()}
    ids = torch.zeros((1, rows * cfg.max_seq_len), dtype=torch.long, device=device)
    positions = torch.arange(cfg.max_seq_len, device=device).repeat(rows)[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def _hidden_sum(model, batch):
    """A loss without the lm head and cross-entropy: isolates their memory."""
    from tuneoff.loss import hidden_states_out

    with hidden_states_out(model):
        hidden = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return hidden.float().sum()


def _forward_backward(model, batches, with_loss: bool, chunk: int) -> None:
    from tuneoff.loss import forward_loss

    for batch in batches:
        loss = forward_loss(model, batch, chunk) if with_loss else _hidden_sum(model, batch)
        loss.backward()


def _trace_cfg(cfg: Config, runtime: Runtime) -> tuple[Config, torch.dtype]:
    """The config traced on meta (the real weights' dtype) and the run's autocast dtype (its
    weights' dtype without autocast). QLoRA is traced as LoRA (the 4-bit weights are added by
    formula), 8-bit AdamW as AdamW."""
    real_dtype = weights_dtype(cfg, runtime)
    act_dtype = real_dtype
    if runtime.precision in ("fp16", "bf16"):  # autocast, on CUDA or (bf16) on CPU
        act_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[runtime.precision]
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[real_dtype]
    method = "lora" if cfg.method == "qlora" else cfg.method
    if method == "full" and dtype_name == "fp16":
        dtype_name = "bf16"  # same bytes; fp16 is refused for full weights
    fast_dropout = cfg.fast_dropout and runtime.device == "cpu"  # as prepare_model decides
    return cfg.replace(
        method=method, weights_dtype=dtype_name, fast_dropout=fast_dropout
    ), act_dtype


def _meta_model(arch_config: Any, cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            arch_config, dtype=torch.float32, attn_implementation="sdpa"
        )
    return prepare_model(model, cfg, Runtime("cpu", "fp32", "trace"))


def _trace_train(arch_config, cfg: Config, runtime: Runtime, with_loss: bool) -> int:
    """Peak bytes of activations, logits and temporaries over one accumulation window's
    forward and backward passes (gradients apart), traced on the meta device."""
    from tuneoff.measure import TensorMemory

    trace_cfg, act_dtype = _trace_cfg(cfg, runtime)
    model = _meta_model(arch_config, trace_cfg)
    model.train()
    batches = [trace_batch(cfg, "meta")]  # each micro-batch frees its activations
    existing = tuple(t for b in batches for t in b.values())
    varlen = getattr(model.config, "_attn_implementation", None) == attention.NAME
    fp32_attention = varlen and runtime.device == "cpu" and act_dtype != torch.float32
    with _flash_on_meta(fp32_attention), TensorMemory(model, existing) as memory:
        _forward_backward_as_run(model, batches, with_loss, cfg.loss_chunk_size, act_dtype, memory)
    return memory.peak_bytes


def _trace_eval(arch_config, cfg: Config, runtime: Runtime) -> int:
    """Activation and logit bytes of one evaluation batch's forward."""
    from tuneoff.loss import stats_tensors
    from tuneoff.measure import TensorMemory

    trace_cfg, act_dtype = _trace_cfg(cfg, runtime)
    model = _meta_model(arch_config, trace_cfg)
    model.eval()
    batch = trace_batch(cfg, "meta", eval_batch=True)
    weights = {id(p) for p in model.parameters()}
    with _flash_on_meta(), TensorMemory(model, tuple(batch.values())) as memory:
        autocast = _AutocastOnMeta(act_dtype, memory, weights)
        with autocast if act_dtype != torch.float32 else contextlib.nullcontext():
            stats_tensors(model, batch, cfg.loss_chunk_size)
    return memory.peak_bytes


# --------------------------------------------------------------------------- formulas


def _params(arch_config, cfg: Config, runtime: Runtime):
    """(name, numel, dtype, trainable, is_quantized_linear) of the prepared model's params, and
    the bytes of its buffers (floating ones take the weights' dtype, as `model.to` does)."""
    trace_cfg = cfg.replace(method="lora" if cfg.method == "qlora" else cfg.method)
    model = _meta_model(arch_config, trace_cfg)
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
    _, act_dtype = _trace_cfg(cfg, runtime)
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
            traced[ckpt] = _trace_train(arch_config, ckpt_cfg, runtime, with_loss=False)
            acts[ckpt] = traced[ckpt]
        activations = acts[cfg.gradient_checkpointing]
        with_loss = _trace_train(arch_config, cfg, runtime, with_loss=True)
        logits = max(0, with_loss - traced[cfg.gradient_checkpointing])
    components = {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logits_and_loss": logits,
        "autocast_copies": _autocast_copies(params, cfg, runtime, act_dtype) if training else 0,
        "step_temporaries": _step_temporaries(params, cfg, runtime),
        "evaluation": _trace_eval(arch_config, cfg, runtime),
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
        "max_seq_len": cfg.max_seq_len,
        "eval_batch_size": cfg.eval_batch_size,
    }


# --------------------------------------------------------------------------- measurement


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights and buffers, 4-bit weights' quantization statistics included."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def measure(cfg: Config, arch_config: Any, runtime: Runtime) -> dict[str, Any]:
    """A few real steps with random weights of the exact architecture (no download): bytes by
    component counted tensor by tensor (exact on any device), and on CUDA the allocator's
    peaks over one full accumulation window."""
    from transformers import AutoModelForCausalLM

    from tuneoff.loss import forward_stats
    from tuneoff.measure import TensorMemory
    from tuneoff.optim import make_optimizer, optimizer_state_bytes

    torch.manual_seed(cfg.seed)
    with torch.device(runtime.device):  # random weights made where they will live
        model = AutoModelForCausalLM.from_config(
            arch_config, dtype=torch.float32, attn_implementation="sdpa"
        )
    model = prepare_model(model, cfg, runtime).to(runtime.device)
    model.train()
    optimizer = make_optimizer(model, cfg, runtime.device)
    vocab = arch_config.vocab_size

    def batch(eval_batch: bool = False) -> dict[str, torch.Tensor]:
        b = trace_batch(cfg, runtime.device, eval_batch)
        b["input_ids"] = torch.randint(0, vocab, b["input_ids"].shape, device=runtime.device)
        return {**b, "labels": b["input_ids"].clone()}

    autocast = (
        torch.autocast(
            runtime.device, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[runtime.precision]
        )
        if runtime.precision != "fp32"
        else contextlib.nullcontext()
    )
    out: dict[str, Any] = {"weights": _weight_bytes(model)}
    with autocast:
        _forward_backward(model, [batch()], True, cfg.loss_chunk_size)  # optimizer states exist
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks = {}
        for with_loss in (False, True):
            window = [batch()]  # one micro-batch: later ones reach the same peak
            existing = tuple(t for b in window for t in b.values())
            with TensorMemory(model, existing) as memory:
                _forward_backward(model, window, with_loss, cfg.loss_chunk_size)
            peaks[with_loss] = memory.peak_bytes
            out["gradients"] = sum(
                p.grad.numel() * p.grad.element_size()
                for p in model.parameters()
                if p.grad is not None
            )
            optimizer.zero_grad(set_to_none=True)
        out["activations"] = peaks[False]
        out["logits_and_loss"] = max(0, peaks[True] - peaks[False])
        out["optimizer"] = optimizer_state_bytes(optimizer)
        model.eval()
        eval_batch = batch(eval_batch=True)
        with TensorMemory(model, tuple(eval_batch.values())) as memory:
            forward_stats(model, eval_batch, cfg.loss_chunk_size)
        out["evaluation"] = memory.peak_bytes
        model.train()
        if runtime.device == "cuda":
            out.update(_cuda_window(model, optimizer, cfg, batch))
    return out


def _cuda_window(model, optimizer, cfg: Config, batch) -> dict[str, int]:
    """The allocator's peaks over one accumulation window, its optimizer step, and one
    evaluation batch: what `torch.cuda.max_memory_allocated` says a real step needs."""
    from tuneoff.loss import forward_stats

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    _forward_backward(model, [batch() for _ in range(cfg.grad_accum)], True, cfg.loss_chunk_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    forward_stats(model, batch(eval_batch=True), cfg.loss_chunk_size)
    model.train()
    torch.cuda.synchronize()
    return {
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(),
        "cuda_peak_reserved": torch.cuda.max_memory_reserved(),
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
    if cfg.batch_size > 1:
        change = {"batch_size": cfg.batch_size // 2, "grad_accum": cfg.grad_accum * 2}
        steps.append((change, "same effective batch; smaller micro-batches, lower throughput"))
    return steps


def advise(
    cfg: Config, arch_config: Any, runtime: Runtime, limit: int, pred: Prediction | None = None
) -> dict[str, Any]:
    """The cheapest changes, in order, after which the arm fits in `limit` bytes (reserved
    memory plus the CUDA context on a GPU), and the prediction for them."""
    pred = pred or predict(cfg, arch_config, runtime, both_checkpointing=False)
    changes: list[dict[str, Any]] = []
    while _needs(pred, runtime) > limit:
        steps = _ladder(cfg, runtime, pred)
        if not steps:
            break
        change, cost = steps[0]
        cfg = cfg.replace(**change)
        if "precision" in change:
            runtime = planning_runtime(cfg)
        pred = predict(cfg, arch_config, runtime, both_checkpointing=False)
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


def plan_arms(
    cfg: Config, methods: list[str], limit: int | None, arch_config: Any | None = None
) -> dict[str, Any]:
    """Prediction, verdict and advice for each method: what `tuneoff plan` prints."""
    from tuneoff.model import load_arch_config

    arch_config = arch_config or load_arch_config(cfg.model)
    runtime = planning_runtime(cfg)
    arms = {}
    for method in methods:
        arm_cfg = cfg.replace(method=method)
        pred = predict(arm_cfg, arch_config, runtime)
        arm = {"prediction": pred.to_dict(), "needs_gib": _needs(pred, runtime) / GIB}
        if limit is not None:
            arm["fits"] = _needs(pred, runtime) <= limit
            if not arm["fits"]:
                arm["advice"] = advise(arm_cfg, arch_config, runtime, limit, pred)
        arms[method] = arm
    return {
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


def _param_count(arch_config: Any) -> int:
    model = _meta_model(arch_config, Config(method="base"))
    return sum(p.numel() for p in model.parameters())


def measure_arms(cfg: Config, methods: list[str], arch_config: Any) -> dict[str, Any]:
    """`tuneoff plan --measure`: for each method, the prediction for this machine's runtime
    beside a measurement of real steps with random weights of the architecture."""
    import gc

    from tuneoff.model import choose_runtime

    runtime = choose_runtime(cfg)
    out: dict[str, Any] = {"runtime": {"device": runtime.device, "precision": runtime.precision}}
    for method in methods:
        arm_cfg = cfg.replace(method=method)
        pred = predict(arm_cfg, arch_config, runtime, both_checkpointing=False)
        measured = measure(arm_cfg, arch_config, runtime)
        predicted = {
            **pred.components,
            "peak_allocated": pred.peak_allocated,
            "peak_reserved": pred.peak_reserved,
        }
        if "cuda_peak_allocated" in measured:
            measured["peak_allocated"] = measured.pop("cuda_peak_allocated")
            measured["peak_reserved"] = measured.pop("cuda_peak_reserved")
        out[method] = {
            "predicted_gib": {k: v / GIB for k, v in predicted.items()},
            "measured_gib": {k: v / GIB for k, v in measured.items()},
        }
        gc.collect()
        if runtime.device == "cuda":
            torch.cuda.empty_cache()
    return out
