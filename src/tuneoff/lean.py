"""Lean activations: cheap elementwise results are recomputed in backward instead of saved.

Autograd keeps every intermediate that a backward formula reads. For the three cheapest
producers of such intermediates in a Llama-style decoder layer, `use_lean_activations` swaps in
an autograd function that saves only what cannot be recomputed in one elementwise pass:
- SwiGLU (`down(silu(gate) * up)`): saves gate and up, not silu(gate) (one intermediate-size
  tensor per layer and token, the largest saved activation of these models). Forward and
  gradients are bitwise those of the stock module: backward recomputes silu(gate) with the
  same kernel and calls the same `silu_backward`.
- RMSNorm: saves its input in its own dtype and one fp32 scalar per token, not the fp32 copy
  of a half-precision input nor the normalized tensor (when the norm weight trains); an fp32
  input to a frozen norm keeps the stock computation, which saves no more. Same forward;
  gradients equal to floating-point rounding.
- LoRA dropout (`lora_layers.py`): each adapter's lora_A draws its dropout mask itself and
  keeps x (one tensor for q, k and v) and the mask in bits or as a seed, not a dropped copy
  of x; a plain adapter on a frozen linear layer runs as one autograd function.
- Saved tensors (`SavedTensors`, saved-tensor hooks around the model's training forward):
  a cast that several layers make of the same tensor is kept once (under autocast with fp32
  weights, q, k and v each cast the same normalized input, and so do gate and up); the SwiGLU
  product that down_proj keeps for its weight gradient is recomputed from gate and up, which
  are kept anyway; the fp32 copies that the CPU attention kernel makes of bf16 inputs are kept
  in bf16 (`attention.py`). Each is exact: the same values are unpacked in backward.

Only modules whose forward is known to be the pattern above are swapped (class names below);
every other module and model keeps its own forward. Outside training (no grad) the stock
computation runs. `lean_activations=false` switches all of this off for an ablation.
"""

from __future__ import annotations

import contextlib
import types
from typing import Any

import torch
import torch.nn.functional as F

from tuneoff.lora_layers import lean_lora_dropout

# Modules whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))` and
# `weight * normalize(x.float()).to(x.dtype)`: checked against the stock forwards in tests.
SWIGLU_MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP", "GraniteMLP", "Olmo2MLP")
RMS_NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "GraniteRMSNorm")


def use_lean_activations(model: torch.nn.Module, fast_masks: bool = False) -> dict[str, int]:
    """Swap in the lean forwards where a module matches; returns how many of each kind."""
    counts = {"swiglu": 0, "rms_norm": 0, "lora_dropout": 0, "saved_tensors": 0}
    if _saves_weight_inputs(model):  # else nothing for `SavedTensors` to share or recompute
        model.forward = types.MethodType(_forward_saving_lean, model)
        counts["saved_tensors"] = 1
    for module in model.modules():
        name = type(module).__name__
        if name in SWIGLU_MLPS and _is_silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_swiglu_mlp_forward, module)
            counts["swiglu"] += 1
        elif name in RMS_NORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
            counts["rms_norm"] += 1
        counts["lora_dropout"] += lean_lora_dropout(module, fast_masks)
    return counts


def _saves_weight_inputs(model: torch.nn.Module) -> bool:
    """Does some linear layer other than a LoRA adapter's own train (full fine-tuning), or
    does an adapter sit on down_proj? Only then does autograd keep the inputs that
    `SavedTensors` shares or recomputes; otherwise its hooks would cost time for nothing
    (about 1 us per saved tensor; Qwen2.5-1.5B's 28 layers save 872 per micro-batch in full
    fine-tuning, 1,456 with LoRA on every linear layer)."""
    adapters = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}
    for name, module in model.named_modules():
        parts = name.split(".")
        if adapters.intersection(parts):  # an adapter's own linear: its input is kept anyway
            continue
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            return True
        if parts[-1] == "down_proj" and any(p.requires_grad for p in module.parameters()):
            return True
    return False


def _is_silu(act: Any) -> bool:
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"


# --------------------------------------------------------------------------- SwiGLU


def _swiglu_mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return type(self).forward(self, x)  # the class's own forward
    gate, up = self.gate_proj(x), self.up_proj(x)
    product = _SwiGLU.apply(gate, up)
    saved = active_saved_tensors()
    if saved is None:
        return self.down_proj(product)
    with saved.recomputed(product, _swiglu_product, gate, up):  # down_proj's weight gradient
        return self.down_proj(product)


def _swiglu_product(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up  # the kernels of `_SwiGLU.forward`: bitwise the same product


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return _swiglu_product(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Each result is written over the temporary it comes from (one intermediate-size tensor
        # fewer alive at once): the same kernels, the same values.
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            product = grad * up
            grad_gate = torch.ops.aten.silu_backward.grad_input(product, gate, grad_input=product)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


# --------------------------------------------------------------------------- saved tensors


def _forward_saving_lean(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's own forward, under `SavedTensors` while training. Not when compiled (no
    saved-tensor hooks in a graph) nor inside another hook (gradient checkpointing of the
    whole model, a profiler's), which must see every saved tensor itself."""
    forward = type(self).forward
    training = self.training and torch.is_grad_enabled()
    if not training or torch.compiler.is_compiling() or top_saved_hooks() is not None:
        return forward(self, *args, **kwargs)
    with SavedTensors():
        return forward(self, *args, **kwargs)


def top_saved_hooks() -> Any:
    """The innermost saved-tensor hooks now active (pack, unpack), or None; through a private
    torch function (without it: a sentinel, as if another hook were active)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else (None, None)


_ACTIVE: list[SavedTensors] = []


def active_saved_tensors() -> SavedTensors | None:
    """The `SavedTensors` that would see a tensor saved now: entered, and not shadowed by a
    hook pushed inside it (checkpointing's)."""
    if not _ACTIVE or not torch.is_grad_enabled():
        return None
    top = top_saved_hooks()
    return _ACTIVE[-1] if top is not None and top[0] is _ACTIVE[-1].pack else None


class SavedTensors:
    """Saved-tensor hooks that keep fewer bytes for backward, every value unpacked exact:
    - a cast (`ToCopyBackward0`) of a tensor to a dtype, shape and layout already cast and
      saved in this forward is kept as that first cast: with fp32 weights under autocast, each
      linear layer casts its input itself, so q, k and v kept three half-precision copies of
      one normalized input and gate and up two;
    - a tensor `recomputed` names is kept as the recipe that makes it again (the SwiGLU
      product, recomputed from gate and up for down_proj's weight gradient);
    - views of a tensor `narrowed` names (an fp32 copy of a half-precision tensor) are kept in
      that dtype and widened again: an exact round trip.
    """

    def __init__(self, narrow: dict[int, torch.dtype] | None = None) -> None:
        self.casts: dict[tuple, torch.Tensor] = {}
        self.recipes: list[tuple[torch.Tensor, Any, tuple]] = []
        self.narrow = dict(narrow or {})  # storage `_cdata` -> the dtype of its source
        self.pack = self._pack  # one bound method: `active_saved_tensors` compares identity
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.pop()
        self.casts.clear()
        self._hooks.__exit__(*exc)

    @contextlib.contextmanager
    def recomputed(self, tensor: torch.Tensor, fn: Any, *args: torch.Tensor):
        """While active, a save of `tensor` (contiguous), or of a view of it, keeps `fn` and
        `args` (kept anyway) instead, and the view's layout."""
        if not tensor.is_contiguous() or tensor.storage_offset():
            yield
            return
        self.recipes.append((tensor, fn, args))
        try:
            yield
        finally:
            self.recipes.pop()

    @contextlib.contextmanager
    def narrowed(self, widened: dict[int, torch.dtype]):
        """While active, views of these storages (`_cdata` -> source dtype) are kept narrow."""
        self.narrow.update(widened)
        try:
            yield
        finally:
            for key in widened:
                self.narrow.pop(key, None)

    def _pack(self, t: torch.Tensor) -> Any:
        if self.narrow and t.dtype == torch.float32:
            low = self.narrow.get(t.untyped_storage()._cdata)
            if low is not None:
                return ("narrow", t.to(low))
        if self.recipes:
            storage = t.untyped_storage()._cdata
            for tensor, fn, args in self.recipes:
                if storage == tensor.untyped_storage()._cdata and t.dtype == tensor.dtype:
                    return ("recompute", fn, args, t.shape, t.stride(), t.storage_offset())
        source = _cast_source(t.grad_fn)
        if source is not None:
            key = (*source, t.dtype, t.shape, t.stride(), t.storage_offset())
            first = self.casts.setdefault(key, t)
            if first is not t:
                return ("same", first)
        return t


# Autograd nodes of views: a tensor reached from a cast through these holds the cast's values.
_VIEWS = frozenset(
    f"{name}Backward0"
    for name in (
        "View",
        "UnsafeView",
        "T",
        "Transpose",
        "Permute",
        "Expand",
        "Unsqueeze",
        "Squeeze",
        "Slice",
        "Select",
        "AsStrided",
        "Reshape",
        "Alias",
    )
)


def _cast_source(node: Any) -> tuple[Any, int] | None:
    """(node, output index) of the tensor that a cast, seen through views, was made from; two
    saved tensors with the same source, dtype and layout hold the same values."""
    while node is not None and type(node).__name__ in _VIEWS and len(node.next_functions) == 1:
        node = node.next_functions[0][0]
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return None
    source, index = node.next_functions[0]
    return None if source is None else (source, index)


def _unpack(saved: Any) -> torch.Tensor:
    if not isinstance(saved, tuple):
        return saved
    if saved[0] == "narrow":
        return saved[1].float()
    if saved[0] == "recompute":
        _, fn, args, shape, stride, offset = saved
        return fn(*args).as_strided(shape, stride, offset)
    return saved[1]


# --------------------------------------------------------------------------- RMSNorm


def _rms_norm_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # An fp32 input with a frozen weight: autograd keeps only x and 1/rms too, with its own
    # (faster) backward.
    stock = x.dtype == torch.float32 and not self.weight.requires_grad
    if stock or not torch.is_grad_enabled():
        return type(self).forward(self, x)  # the class's own forward
    return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) computed in fp32 and cast back to x's dtype before the weight, as
    transformers' Llama-family norms do; saves x and the fp32 reciprocal rms per token."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # In place where a temporary dies anyway: at the final norm, the first layer backward
        # reaches, every activation is still alive, so its temporaries set the step's peak.
        # Same operations in the same order as out of place: the same values.
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32).mul_(rstd) if x.dtype != torch.float32 else x * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            per_token = grad * normed.to(x.dtype)
            grad_weight = per_token.reshape(-1, per_token.shape[-1]).sum(0).to(weight.dtype)
            del per_token
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            dot = (g * normed).mean(-1, keepdim=True)
            grad_x = g.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)  # (g - normed dot) rstd
        return grad_x, grad_weight, None
