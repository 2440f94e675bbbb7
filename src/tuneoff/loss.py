"""The causal-LM loss over supervised tokens, with or without full-vocabulary logits.

With `loss_chunk_size` 0 the model computes logits for every position of the batch and the loss
is an ordinary cross-entropy, as in the reference (for Qwen2.5, 151,936 logits per token, in fp32
for the loss). Otherwise the model returns its final hidden states, only the positions whose next
token is supervised are kept, and the lm head and cross-entropy run over chunks of
`loss_chunk_size` of them. The gradient of each chunk is computed in the forward pass (as Liger's
fused linear cross-entropy does), so no chunk's logits outlive it. Same loss, same gradients,
a fraction of the memory, and no lm-head work at prompt positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

IGNORE = -100
# Vocabulary rows per product when an fp32 head gradient gathers 16-bit products (fp32 weights
# under autocast): caps that temporary at VOCAB_SLICE x hidden (50 MB for Qwen2.5-1.5B, not
# the 0.43 GiB of the whole head).
VOCAB_SLICE = 16384


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy in nats over supervised tokens (logits at t predict label t + 1)."""
    shift_logits = logits[:, :-1, :].float()
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The lm head under any wrapping (DDP, torch.compile, PEFT)."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.get_output_embeddings()


@contextmanager
def hidden_states_out(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """While active, the model's `logits` are its final hidden states: the lm head is skipped
    (its forward is the identity) and the chunked loss applies its weight itself. The model
    is still called through its wrappers, so DDP and PEFT hooks run as usual."""
    head = output_head(model)
    head.forward = _identity
    try:
        yield head
    finally:
        del head.forward


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# The autocast dtype while the planner traces an autocast run on the meta device (which has no
# autocast of its own): set by `trace._AutocastOnMeta`.
META_AUTOCAST: torch.dtype | None = None


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in: autocast's where it is on, else `dtype`."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    if device.type == "meta" and META_AUTOCAST is not None:
        return META_AUTOCAST
    return dtype


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_i CE(h_i W^T, y_i) over chunks of rows; gradients computed chunk by chunk here."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, dtype: torch.dtype):
        w = weight.to(dtype)
        grad_h = torch.empty_like(hidden)
        # The weight's gradient in its own dtype when that is 16-bit (its .grad is too), else fp32.
        grad_w = torch.zeros_like(weight) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_size):
            h = hidden[start : start + chunk_size].to(dtype)
            y = targets[start : start + chunk_size]
            logits = (h @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[torch.arange(y.numel(), device=y.device), y] -= 1
            g = probs.to(dtype)
            grad_h[start : start + chunk_size] = (g @ w).to(hidden.dtype)
            if grad_w is not None and grad_w.dtype == dtype:
                grad_w.addmm_(g.t(), h)  # in place: no weight-sized temporary
            elif grad_w is not None:  # fp32 gradient of 16-bit products: a slice at a time
                for v in range(0, grad_w.size(0), VOCAB_SLICE):
                    grad_w[v : v + VOCAB_SLICE].add_(g[:, v : v + VOCAB_SLICE].t() @ h)
            del logits, probs, g
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h.mul_(grad_out.to(grad_h.dtype))  # in place: these buffers die here
        gw = grad_w.mul_(grad_out).to(ctx.weight_dtype) if ctx.has_grad_w else None
        return gh, gw, None, None, None


def _supervised_rows(hidden: torch.Tensor, labels: torch.Tensor):
    """Hidden states at positions whose next token is supervised, and those next tokens."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return hidden[:, :-1][mask], targets[mask]


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    # No KV cache: it is useless in a training or scoring pass, and with one, transformers does
    # not build the block mask of a packed batch (its examples would attend to each other).
    return {**{k: v for k, v in batch.items() if k != "labels"}, "use_cache": False}


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int):
    """Summed loss (a scalar tensor with a graph) of one batch; `chunk_size` 0 = full logits."""
    if not chunk_size:
        return loss_sum(model(**_model_inputs(batch)).logits, batch["labels"])
    with hidden_states_out(model) as head:
        hidden = model(**_model_inputs(batch)).logits
    rows, targets = _supervised_rows(hidden, batch["labels"])
    dtype = compute_dtype(rows.device, rows.dtype)
    return _ChunkedLinearCE.apply(rows, head.weight, targets, chunk_size, dtype)


@torch.no_grad()
def forward_stats(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int
) -> tuple[float, int, int]:
    """(summed cross-entropy in nats, correct argmax predictions, supervised tokens)."""
    total, correct, tokens = stats_tensors(model, batch, chunk_size)
    return float(total), int(correct), tokens


@torch.no_grad()
def stats_tensors(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk_size: int):
    """`forward_stats` before any value is read (the planner traces it on the meta device)."""
    if not chunk_size:
        logits = model(**_model_inputs(batch)).logits
        rows, targets = _supervised_rows(logits, batch["labels"])
        correct = (rows.argmax(-1) == targets).sum()
        return loss_sum(logits, batch["labels"]), correct, targets.numel()
    with hidden_states_out(model) as head:
        hidden = model(**_model_inputs(batch)).logits
    rows, targets = _supervised_rows(hidden, batch["labels"])
    dtype = compute_dtype(rows.device, rows.dtype)
    w = head.weight.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    correct = torch.zeros((), dtype=torch.long, device=rows.device)
    for start in range(0, rows.size(0), chunk_size):
        logits = (rows[start : start + chunk_size].to(dtype) @ w.t()).float()
        y = targets[start : start + chunk_size]
        total += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
    return total, correct, targets.numel()
