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
- LoRA dropout: PEFT computes `lora_B(lora_A(dropout(x)))`, so each adapter's lora_A saves its
  own dropped copy of x (q, k and v each keep one of the same input). Here lora_A draws the
  mask itself, saves x (one tensor shared by q, k and v) and the mask packed in one bit per
  element (numpy masks on CPU) or only the seed it was drawn from (torch's generator, drawn
  again in backward), and recomputes the dropped input in backward. Same distribution; on CPU
  the masks are the same draws as `FastDropout`'s (numpy, seeded from torch), so losses equal
  those without lean activations. While training one plain adapter on a frozen linear layer,
  PEFT's `base(x) + scale * B(A(dropout(x)))` runs as one autograd function (`_LoRALinear`),
  the adapter's output added into the base's by one addmm: fewer kernels and less Python per
  adapter, where a launch-bound step waits on them.

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
import math
import types
from typing import Any

import torch
import torch.nn.functional as F

from tuneoff.loss import compute_dtype

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
        counts["lora_dropout"] += _lean_lora_dropout(module, fast_masks)
    return counts


def _saves_weight_inputs(model: torch.nn.Module) -> bool:
    """Does some linear layer other than a LoRA adapter's own train (full fine-tuning), or
    does an adapter sit on down_proj? Only then does autograd keep the inputs that
    `SavedTensors` shares or recomputes; otherwise its hooks would cost time (about 1 us per
    saved tensor, ~1,000 per micro-batch of a 1.5B model) for nothing."""
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
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        return grad_gate, grad_up


# --------------------------------------------------------------------------- saved tensors


def _forward_saving_lean(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's own forward, under `SavedTensors` while training. Not when compiled (no
    saved-tensor hooks in a graph) nor inside another hook (gradient checkpointing of the
    whole model, a profiler's), which must see every saved tensor itself."""
    forward = type(self).forward
    if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return forward(self, *args, **kwargs)
    if top_saved_hooks() is not None:
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
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            per_token = grad * normed.to(x.dtype)
            grad_weight = per_token.reshape(-1, per_token.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            g = (grad * weight).to(torch.float32)
            dot = (g * normed).mean(-1, keepdim=True)
            grad_x = ((g - normed * dot) * rstd).to(x.dtype)
        return grad_x, grad_weight, None


# --------------------------------------------------------------------------- LoRA dropout


def _lean_lora_dropout(module: torch.nn.Module, fast_masks: bool) -> int:
    """Fold each plain-LoRA adapter's dropout into its lora_A (a `DropoutLinear`, same weight
    and state-dict key) and drop PEFT's input cast, which would copy x for every adapter."""
    drops, lora_a = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
    if not isinstance(drops, torch.nn.ModuleDict) or not isinstance(lora_a, torch.nn.ModuleDict):
        return 0
    variants = getattr(module, "lora_variant", {}) or {}
    swapped = 0
    for name, drop in list(drops.items()):
        if name not in lora_a:
            continue
        linear = lora_a[name]
        if (
            not isinstance(drop, torch.nn.Dropout)
            or drop.p <= 0
            or type(linear) is not torch.nn.Linear
            or name in variants  # DoRA and other variants read the dropped input themselves
        ):
            continue
        linear.__class__ = DropoutLinear
        linear.p, linear.fast_masks = drop.p, fast_masks
        drops[name] = torch.nn.Identity()
        swapped += 1
    if swapped:
        module.cast_input_dtype_enabled = False  # DropoutLinear casts as PEFT would
        if _is_peft_lora_linear(module):
            module.forward = types.MethodType(_lora_linear_forward, module)
    return swapped


def _is_peft_lora_linear(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "Linear" and cls.__module__ == "peft.tuners.lora.layer"


def _lora_linear_forward(self: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any):
    """PEFT's LoRA Linear forward, `base(x) + scale * B(A(dropout(x)))`, in one autograd
    function where the case is plain (see `_plain_adapter`); PEFT's own forward otherwise."""
    plain = None if args or kwargs else _plain_adapter(self, x)
    if plain is None:
        return type(self).forward(self, x, *args, **kwargs)
    name, base, lora_a, lora_b, dtype = plain
    keep, seed = lora_a.mask(x)
    weights = (base.weight, base.bias, lora_a.weight, lora_b.weight)
    return _LoRALinear.apply(x, *weights, keep, seed, lora_a.p, self.scaling[name], dtype)


def _plain_adapter(self: torch.nn.Module, x: torch.Tensor) -> tuple | None:
    """(adapter, base, lora_A, lora_B, compute dtype) when training one active plain adapter
    (lean lora_A, no biases, no variant such as DoRA) on a frozen `nn.Linear`, eagerly, with
    the base and the adapter computing in one dtype (autocast's, or a common weight dtype);
    else None. Read on every call (about 1,000 a micro-batch on a 1.5B model): kept cheap."""
    if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        return None
    if self.disable_adapters or self.merged:
        return None
    modules = self._modules  # nn.Module.__getattr__ would look through three dicts each time
    active, lora_as, lora_bs = self.active_adapters, modules["lora_A"], modules["lora_B"]
    if len(active) != 1 or active[0] not in lora_as._modules or active[0] not in lora_bs._modules:
        return None
    name = active[0]
    base, lora_a, lora_b = modules["base_layer"], lora_as._modules[name], lora_bs._modules[name]
    if type(lora_a) is not DropoutLinear or type(lora_b) is not torch.nn.Linear:
        return None
    if type(base) is not torch.nn.Linear or name in (getattr(self, "lora_variant", None) or {}):
        return None
    weight, bias = base.weight, base.bias
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not frozen or lora_a.bias is not None or lora_b.bias is not None:
        return None
    dtype = compute_dtype(x.device, weight.dtype)
    if compute_dtype(x.device, lora_a.weight.dtype) != dtype:  # no autocast, mixed dtypes
        return None
    return name, base, lora_a, lora_b, dtype


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # no dispatch where nothing changes


class _LoRALinear(torch.autograd.Function):
    """base(x) + scale * B(A(x * keep / (1 - p))) with a frozen base: the adapter's output
    is added into the base's by one addmm (scale and 1/(1-p) as its alpha); keeps x (one tensor
    for q, k and v), the base weight as computed with, A, B, A's rank-r output and the mask as
    `_DropoutLinear` keeps it (bits, a seed, or whole when compiled). Gradients for x, A, B."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, keep, seed, p: float, scale: float, dtype):
        xc, w, ac, bc = _to(x, dtype), _to(weight, dtype), _to(a, dtype), _to(b, dtype)
        h = F.linear(_masked(xc, keep), ac)  # [..., r], before 1 / (1 - p)
        out = F.linear(xc, w, None if bias is None else _to(bias, dtype))
        alpha = scale / (1.0 - p)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), bc.t(), alpha=alpha)
        mask = keep if seed is not None or torch.compiler.is_compiling() else pack_bits(keep)
        ctx.save_for_backward(x, w, ac, bc, h, *(() if seed is not None else (mask,)))
        ctx.alpha, ctx.seed, ctx.p, ctx.shape = alpha, seed, p, keep.shape
        ctx.dtypes = (a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, a, b, h, *stored = ctx.saved_tensors
        if ctx.seed is not None:
            keep = _seeded_mask(ctx.shape, x.device, ctx.p, ctx.seed)
        else:
            keep = unpack_bits(stored[0], ctx.shape)
        flat = _to(grad, w.dtype).reshape(-1, grad.shape[-1])
        g = flat.mm(b).mul_(ctx.alpha)  # d out / d h, [n, r]
        grad_b = _to(flat.t().mm(h.reshape(-1, h.shape[-1])).mul_(ctx.alpha), ctx.dtypes[1])
        dropped = _masked(_to(x, w.dtype), keep)
        grad_a = _to(g.t().mm(dropped.reshape(-1, dropped.shape[-1])), ctx.dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora = g.mm(a).view(keep.shape)
            grad_x = flat.mm(w).view(keep.shape).addcmul_(lora, keep.view(torch.uint8))
            grad_x = _to(grad_x, x.dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


class DropoutLinear(torch.nn.Linear):
    """`linear(dropout(x))` that saves x rather than the dropped copy of x, and for the mask
    either its bits (numpy masks on CPU) or the seed of torch's generator that drew it (drawn
    again in backward: no bytes, and two kernels where packing and unpacking take nine, which
    matters where the step is launch-bound). Under autocast it computes in the autocast dtype;
    otherwise in its weight's dtype, after casting x to it (PEFT's `_cast_input_dtype`)."""

    p: float = 0.0
    fast_masks: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x.device, self.weight.dtype)
        if not self.training or not torch.is_grad_enabled():
            return F.linear(x.to(dtype), self.weight.to(dtype), _cast(self.bias, dtype))
        keep, seed = self.mask(x)
        # Casts are explicit: under autocast `dtype` is its dtype, so it casts nothing more.
        return _DropoutLinear.apply(x, self.weight, self.bias, keep, seed, self.p, dtype)

    def mask(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """The keep mask for x, and the seed that draws it again (None: kept in bits)."""
        device = x.device.type
        if self.fast_masks and device in ("cpu", "meta"):
            return _keep_mask(x.shape, device, self.p), None
        if torch.compiler.is_compiling():  # no private generator in a graph: a kept mask
            return torch.rand(x.shape, device=x.device) >= self.p, None
        # reproducible under torch.manual_seed, and replayed by checkpointing
        seed = int(torch.randint(0, 2**62, ()))
        return _seeded_mask(x.shape, x.device, self.p, seed), seed


_GENERATORS: dict[torch.device, torch.Generator] = {}


def _seeded_mask(shape: torch.Size, device: torch.device, p: float, seed: int) -> torch.Tensor:
    """Keep where torch.rand >= p (as torch's dropout draws), from a private generator seeded
    with `seed`: the same mask whenever it is drawn again."""
    if device.type == "meta":  # the planner's trace: shapes only
        return torch.empty(shape, dtype=torch.bool, device=device)
    gen = _GENERATORS.get(device)
    if gen is None:
        gen = _GENERATORS[device] = torch.Generator(device)
    gen.manual_seed(seed)
    return torch.rand(shape, device=device, generator=gen) >= p


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class _DropoutLinear(torch.autograd.Function):
    """linear(x * keep / (1 - p)), the scale applied on the rank-r side: to the output, and to
    the incoming gradient before it meets the weight, both `r / in` the size of x. The mask
    is kept as bits, or (with `seed`) drawn again in backward, or kept whole when compiled."""

    @staticmethod
    def forward(ctx, x, weight, bias, keep, seed: int | None, p: float, dtype: torch.dtype):
        scale = 1.0 / (1.0 - p)
        cast = weight.to(dtype)  # r x in: kept for backward rather than cast again
        if seed is not None:
            ctx.save_for_backward(x, cast)
        elif torch.compiler.is_compiling():
            ctx.save_for_backward(x, cast, keep)
        else:
            ctx.save_for_backward(x, cast, pack_bits(keep))
        ctx.scale, ctx.weight_dtype, ctx.shape = scale, weight.dtype, keep.shape
        ctx.seed, ctx.p = seed, p
        ctx.bias_dtype = None if bias is None else bias.dtype
        out = F.linear(_masked(x.to(dtype), keep), cast).mul_(scale)
        return out if bias is None else out.add_(bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, *stored = ctx.saved_tensors  # weight: in the compute dtype
        if ctx.seed is not None:
            keep = _seeded_mask(ctx.shape, x.device, ctx.p, ctx.seed)
        else:
            keep = unpack_bits(stored[0], ctx.shape)
        grad = grad.to(weight.dtype)
        scaled = grad * ctx.scale  # d out / d (x * keep) = scale * weight
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[1]:
            dropped = _masked(x.to(weight.dtype), keep)
            flat = scaled.reshape(-1, grad.shape[-1])
            grad_w = flat.t().mm(dropped.reshape(-1, dropped.shape[-1])).to(ctx.weight_dtype)
        bias_dtype = ctx.bias_dtype
        if bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = _masked(scaled.matmul(weight), keep).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x * keep, the mask read as uint8: on CPU a boolean operand is first converted to x's
    dtype by a slow unvectorized pass (121 us against 47 for [2600, 128] fp32; `where` 134)."""
    return torch.mul(x, keep.view(torch.uint8))


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask in one bit per element (uint8; element 8i + j in bit j of byte i): a mask
    kept for backward costs an eighth of its bytes (as bool, the three q/k/v masks took more
    than a bf16 copy of their input). Masks of a size not divisible by 8 stay boolean.

    Eight bools (bytes of 0 or 1) read as one int64 w = sum_j b_j 2^(8j); times M = sum_j
    2^(56-7j), the term b_j 2^(56+j) lands in the top byte and every other product at a distinct
    bit outside it (no carries), so the top byte is sum_j b_j 2^j. Three elementwise passes
    over an eighth of the elements."""
    if keep.numel() % 8:
        return keep
    words = keep.reshape(-1).view(torch.uint8).view(torch.int64)  # 8 mask bytes per word
    return (words * _SPREAD).bitwise_right_shift_(56).to(torch.uint8)  # wraps as two's complement


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The boolean mask of `shape` that `pack_bits` packed: each byte copied into the 8 bytes
    of a word (times 0x0101...01), byte j keeping bit j (and 0x8040...01), then made 0 or 1."""
    if packed.dtype == torch.bool:
        return packed
    words = (packed.to(torch.int64) * _REPEAT).bitwise_and_(_SELECT)
    # each byte 0 or 2^j: + 0x7F sets its top bit iff nonzero (no carry), which moves to bit 0
    words.add_(_HIGH).bitwise_right_shift_(7).bitwise_and_(_REPEAT)
    return words.view(torch.uint8).view(torch.bool).view(shape)


_SPREAD = sum(2 ** (56 - 7 * j) for j in range(8))  # 0x0102040810204080
_REPEAT = 0x0101010101010101
_SELECT = -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201 as a signed int64
_HIGH = 0x7F7F7F7F7F7F7F7F


# --------------------------------------------------------------------------- fast masks


class FastDropout(torch.nn.Dropout):
    """Dropout whose CPU masks come from numpy's SFC64 generator, seeded from torch's: the same
    distribution as torch's up to p's rounding to 2^-16 (`_keep_mask`), several times as fast
    as torch's mt19937 bernoulli, which took a sixth of a LoRA step on the embedded model.
    Elsewhere (CUDA, eval) it is torch's dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type not in ("cpu", "meta"):
            return super().forward(x)
        keep = _keep_mask(x.shape, x.device.type, self.p)
        return _MaskScale.apply(x, keep, 1.0 / (1.0 - self.p))


@torch.compiler.disable  # numpy and a host random draw: outside any compiled graph
def _keep_mask(shape: torch.Size, device: str, p: float) -> torch.Tensor:
    """Keep where a 16-bit uniform >= p (p rounded up to a multiple of 2^-16; torch.rand's
    24-bit uniforms round it to 2^-24): a quarter of a 64-bit draw per element, compared in
    numpy, and the boolean array shared with torch without a copy."""
    if device == "meta":  # the planner's trace of a CPU run: the same tensors
        return torch.empty(shape, dtype=torch.bool, device="meta")
    import numpy as np

    seed = int(torch.randint(0, 2**62, ()))  # reproducible under torch.manual_seed
    numel = math.prod(shape)
    halves = np.random.SFC64(seed).random_raw(-(-numel // 4)).view(np.uint16)[:numel]
    return torch.from_numpy(halves >= math.ceil(p * 2**16)).view(shape)


class _MaskScale(torch.autograd.Function):
    """x * keep * scale, keeping only the boolean mask for backward."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked(x, keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return _masked(grad, keep).mul_(ctx.scale), None, None


def use_fast_dropout(model: torch.nn.Module) -> None:
    """Swap PEFT's LoRA dropout modules for `FastDropout` of the same p."""
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name, drop in drops.items():
                if type(drop) is torch.nn.Dropout:
                    drops[name] = FastDropout(drop.p)
