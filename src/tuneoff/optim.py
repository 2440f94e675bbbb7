"""Optimizers: torch AdamW (fused kernel on CUDA and CPU), bitsandbytes 8-bit AdamW, and
`LeanAdamW`, a plain PyTorch AdamW whose moments are stored in bf16 and which updates bf16
weights with stochastic rounding, so full fine-tuning fits small GPUs where bitsandbytes is
missing.

Bytes of optimizer state per trainable parameter: adamw 8 (fp32 weights; 4 for bf16 weights),
adamw8bit about 2, adamw_lean 4.
"""

from __future__ import annotations

import logging
import math

import torch

from tuneoff.config import Config, ConfigError

log = logging.getLogger(__name__)

# Largest slice updated at once: bounds LeanAdamW's fp32 temporaries (3 x 4 bytes x this).
LEAN_SLICE = 1 << 24


def make_optimizer(model: torch.nn.Module, cfg: Config, device: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {
        "lr": cfg.lr,
        "betas": (cfg.adam_beta1, cfg.adam_beta2),
        "eps": cfg.adam_eps,
        "weight_decay": cfg.weight_decay,
    }
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "optimizer=adamw8bit needs bitsandbytes: pip install 'tuneoff[qlora]', "
                "or use optimizer=adamw_lean (plain PyTorch)"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    if cfg.optimizer == "adamw_lean":
        return LeanAdamW(params, **kwargs)
    if cfg.fused_optimizer and device in ("cuda", "cpu"):  # torch has both kernels
        return torch.optim.AdamW(params, fused=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's state tensors (moments, quantization statistics)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def _stochastic_round_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 `value` into bf16 `target`, rounding up or down at random in proportion to
    the distance, so that small updates survive on average instead of vanishing."""
    bits = value.contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    rounded = (bits + noise) & -65536  # clear the 16 low bits: exactly representable in bf16
    target.copy_(rounded.view(torch.float32))


class LeanAdamW(torch.optim.Optimizer):
    """AdamW with bf16 moments; bf16 weights are updated in fp32 and stochastically rounded.

    The update is computed in fp32, slice by slice, so temporaries stay small; the result is
    AdamW's up to the rounding of the stored moments and weights."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = int(state["step"])
                scale = group["lr"] / (1 - beta1**step)
                root = math.sqrt(1 - beta2**step)
                flat = [t.view(-1) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"])]
                for start in range(0, p.numel(), LEAN_SLICE):
                    w, g, m, v = (t[start : start + LEAN_SLICE] for t in flat)
                    self._update(w, g, m, v, group, scale, root)
        return loss

    @staticmethod
    def _update(w, g, m, v, group, scale: float, root: float) -> None:
        beta1, beta2 = group["betas"]
        g32 = g.float()
        m32 = m.float().lerp_(g32, 1 - beta1)
        v32 = v.float().mul_(beta2).addcmul_(g32, g32, value=1 - beta2)
        _stochastic_round_(m, m32)
        _stochastic_round_(v, v32)
        w32 = w.float()
        if group["weight_decay"]:
            w32.mul_(1 - group["lr"] * group["weight_decay"])
        w32.addcdiv_(m32, v32.sqrt_().div_(root).add_(group["eps"]), value=-scale)
        if w.dtype == torch.bfloat16:
            _stochastic_round_(w, w32)
        else:
            w.copy_(w32)
