"""The meta-device trace of an arm's step, which the planner (`plan.py`) counts.

The arm's real training step (tuneoff's `prepare_model`, loss and backward) runs on the meta
device, where tensors have shapes and dtypes but no storage; `measure.TensorMemory` counts the
live bytes of what it makes. The meta device has no autocast: the trace makes autocast's casts
itself (`_AutocastOnMeta`: matrix products in the autocast dtype, the rest in the weights'
dtype), so fp32 weights keep an fp32 residual stream and a half-precision copy of each linear
layer's input, as in the real run (and lean activations' saved-tensor hooks keep one copy of
alike casts, as they do there). Attention is traced as a flash kernel (saves q, k, v, output
and log-sum-exp, as CUDA's flash and memory-efficient kernels and CPU's flash kernel do).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from tuneoff import attention, loss
from tuneoff.config import Config
from tuneoff.model import Runtime, prepare_model, weights_dtype

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
    """`forward_backward`, under autocast's casts when the run has autocast."""
    if act_dtype == torch.float32:
        forward_backward(model, batches, with_loss, chunk)
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
    position supervised (peak memory is set by the worst batch). With `micro_batch_tokens`:
    as many tokens as it allows (packed: exactly that many; padded rows: as many whole rows),
    at most a step's examples. Packed training batches: one row, with the position ids that
    tell varlen attention where each example starts (evaluation batches are always padded)."""
    rows = cfg.eval_batch_size if eval_batch else cfg.batch_size
    tokens = rows * cfg.max_seq_len
    if cfg.micro_batch_tokens and not eval_batch:
        tokens = min(cfg.batch_size * cfg.grad_accum * cfg.max_seq_len, cfg.micro_batch_tokens)
        rows = tokens // cfg.max_seq_len
    if cfg.batching != "packed" or eval_batch:
        ids = torch.zeros((rows, cfg.max_seq_len), dtype=torch.long, device=device)
        return {"input_ids": ids, "labels": ids.clone()}
    ids = torch.zeros((1, tokens), dtype=torch.long, device=device)
    positions = (torch.arange(tokens, device=device) % cfg.max_seq_len)[None]
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions}


def _hidden_sum(model, batch):
    """A loss without the lm head and cross-entropy: isolates their memory."""
    from tuneoff.loss import hidden_states_out

    with hidden_states_out(model):
        hidden = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids")).logits
    return hidden.float().sum()


def forward_backward(model, batches, with_loss: bool, chunk: int) -> None:
    from tuneoff.loss import forward_loss

    for batch in batches:
        loss = forward_loss(model, batch, chunk) if with_loss else _hidden_sum(model, batch)
        loss.backward()


def trace_cfg(cfg: Config, runtime: Runtime) -> tuple[Config, torch.dtype]:
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


def meta_model(arch_config: Any, cfg: Config) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            arch_config, dtype=torch.float32, attn_implementation="sdpa"
        )
    return prepare_model(model, cfg, Runtime("cpu", "fp32", "trace"))


def trace_train(arch_config, cfg: Config, runtime: Runtime, with_loss: bool) -> int:
    """Peak bytes of activations, logits and temporaries over one accumulation window's
    forward and backward passes (gradients apart), traced on the meta device."""
    from tuneoff.measure import TensorMemory

    traced, act_dtype = trace_cfg(cfg, runtime)
    model = meta_model(arch_config, traced)
    model.train()
    batches = [trace_batch(cfg, "meta")]  # each micro-batch frees its activations
    existing = tuple(t for b in batches for t in b.values())
    varlen = getattr(model.config, "_attn_implementation", None) == attention.NAME
    fp32_attention = varlen and runtime.device == "cpu" and act_dtype != torch.float32
    with _flash_on_meta(fp32_attention), TensorMemory(model, existing) as memory:
        _forward_backward_as_run(model, batches, with_loss, cfg.loss_chunk_size, act_dtype, memory)
    return memory.peak_bytes


def trace_eval(arch_config, cfg: Config, runtime: Runtime) -> int:
    """Activation and logit bytes of one evaluation batch's forward."""
    from tuneoff.loss import stats_tensors
    from tuneoff.measure import TensorMemory

    traced, act_dtype = trace_cfg(cfg, runtime)
    model = meta_model(arch_config, traced)
    model.eval()
    batch = trace_batch(cfg, "meta", eval_batch=True)
    weights = {id(p) for p in model.parameters()}
    with _flash_on_meta(), TensorMemory(model, tuple(batch.values())) as memory:
        autocast = _AutocastOnMeta(act_dtype, memory, weights)
        with autocast if act_dtype != torch.float32 else contextlib.nullcontext():
            stats_tensors(model, batch, cfg.loss_chunk_size)
    return memory.peak_bytes
