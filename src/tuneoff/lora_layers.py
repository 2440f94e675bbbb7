"""LoRA adapters' training path, cheap in memory and in kernels.

PEFT computes `base(x) + scale * lora_B(lora_A(dropout(x)))`, so each adapter's lora_A saves
its own dropped copy of x (q, k and v each keep one of the same input). `lean_lora_dropout`
(part of `lean_activations`) makes lora_A a `DropoutLinear` that draws the mask itself, saves
x (one tensor shared by q, k and v) and the mask packed in one bit per element (numpy masks on
CPU) or only the seed it was drawn from (torch's generator, drawn again in backward), and
recomputes the dropped input in backward. Same distribution; on CPU the masks are the same
draws as `FastDropout`'s (numpy, seeded from torch), so losses equal those without lean
activations. While training one plain adapter on a frozen linear layer, the whole adapter runs
as one autograd function (`_LoRALinear`), its output added into the base's by one addmm:
fewer kernels and less Python per adapter, where a launch-bound step waits on them.

`FastDropout` (`fast_dropout` without lean activations): PEFT's dropout module with numpy's
masks on CPU.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F

from tuneoff.loss import compute_dtype

# --------------------------------------------------------------------------- LoRA dropout


def lean_lora_dropout(module: torch.nn.Module, fast_masks: bool) -> int:
    """Fold each plain-LoRA adapter's dropout into its lora_A (a `DropoutLinear`, same weight
    and state-dict key) and drop PEFT's input cast, which would copy x for every adapter; on
    PEFT's LoRA `Linear`, route plain training calls through `_LoRALinear`."""
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
    (lean lora_A, no biases, no variant such as DoRA) on a frozen `nn.Linear` whose weight is
    whole (not partitioned by DeepSpeed ZeRO-3), eagerly, with
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
    if hasattr(weight, "ds_id"):  # ZeRO-3 gathers a weight only for its own module's forward
        return None
    frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
    if not frozen or lora_a.bias is not None or lora_b.bias is not None:
        return None
    dtype = compute_dtype(x.device, weight.dtype)
    if compute_dtype(x.device, lora_a.weight.dtype) != dtype:  # no autocast, mixed dtypes
        return None
    return name, base, lora_a, lora_b, dtype


def _mask_again(ctx: Any, device: torch.device, stored: list[torch.Tensor]) -> torch.Tensor:
    """In backward, the mask forward drew: again from its seed, or from the kept bits (or,
    compiled, the kept mask itself)."""
    if ctx.seed is not None:
        return _seeded_mask(ctx.shape, device, ctx.p, ctx.seed)
    return unpack_bits(stored[0], ctx.shape)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None or t.dtype == dtype:  # no dispatch where nothing changes (hot: every adapter)
        return t
    return t.to(dtype)


class _LoRALinear(torch.autograd.Function):
    """base(x) + scale * B(A(x * keep / (1 - p))) with a frozen base: the adapter's output
    is added into the base's by one addmm (scale and 1/(1-p) as its alpha); keeps x (one tensor
    for q, k and v), the base weight as computed with, A, B, A's rank-r output and the mask in
    bits or as its seed (eager only: compiled graphs take PEFT's forward). Gradients for x, A,
    B."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, keep, seed, p: float, scale: float, dtype):
        xc, w, ac, bc = _cast(x, dtype), _cast(weight, dtype), _cast(a, dtype), _cast(b, dtype)
        h = F.linear(_masked(xc, keep), ac)  # [..., r], before 1 / (1 - p)
        out = F.linear(xc, w, _cast(bias, dtype))
        alpha = scale / (1.0 - p)
        out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), bc.t(), alpha=alpha)
        ctx.save_for_backward(x, w, ac, bc, h, *(() if seed is not None else (pack_bits(keep),)))
        ctx.alpha, ctx.seed, ctx.p, ctx.shape = alpha, seed, p, keep.shape
        ctx.dtypes = (a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w, a, b, h, *stored = ctx.saved_tensors
        keep = _mask_again(ctx, x.device, stored)
        flat = _cast(grad, w.dtype).reshape(-1, grad.shape[-1])
        g = flat.mm(b).mul_(ctx.alpha)  # d out / d h, [n, r]
        grad_b = _cast(flat.t().mm(h.reshape(-1, h.shape[-1])).mul_(ctx.alpha), ctx.dtypes[1])
        dropped = _masked(_cast(x, w.dtype), keep)
        grad_a = _cast(g.t().mm(dropped.reshape(-1, dropped.shape[-1])), ctx.dtypes[0])
        grad_x = None
        if ctx.needs_input_grad[0]:
            lora = g.mm(a).view(keep.shape)
            grad_x = flat.mm(w).view(keep.shape).addcmul_(lora, keep.view(torch.uint8))
            grad_x = _cast(grad_x, x.dtype)
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
        keep = _mask_again(ctx, x.device, stored)
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
    dtype by a slow unvectorized pass (121 us against 47 for [2600, 128] fp32; `where` 134).
    Compiled, the boolean itself: inductor fuses the product, and torch 2.11's cannot lower a
    bool-to-uint8 view."""
    if torch.compiler.is_compiling():
        return x * keep
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
