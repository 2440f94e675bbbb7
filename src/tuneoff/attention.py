"""Varlen attention for packed batches: each example attends only within itself, at the cost of
its own length squared, whatever the length of the row it is packed in.

transformers' sdpa keeps packed examples apart with a block-diagonal mask over the whole row: it
computes (and, on CPU, materializes) attention over row x row positions, most of them masked.
`varlen_attention_forward` is registered with transformers' `AttentionInterface` as
`tuneoff_varlen`, for causal decoders only (`VARLEN_MODEL_TYPES`). Masks are built as for sdpa,
except that none is built where sdpa would need one only for packing (no padding mask, no
sliding window, no cache): that mask would cost row^2 bytes and be ignored. When the position
ids show packed examples (a restart inside a row) and there is no cache, it attends per example:
- CUDA, fp16/bf16, torch with `torch.nn.attention.varlen.varlen_attn`: one flash-attention varlen
  call over the flattened rows;
- otherwise: causal sdpa per example, in a loop.
Every other call (padded batches, generation, anything with a mask or a KV cache) goes to
transformers' sdpa unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections import Counter
from typing import Any

import torch

from tuneoff import lean

log = logging.getLogger(__name__)

NAME = "tuneoff_varlen"
# Plain causal decoders: attention is causal within a sequence and nothing else (no
# bidirectional spans, no soft-capping), as the per-example path assumes; configs with an
# active sliding window are left on sdpa (`model.use_varlen_attention`).
VARLEN_MODEL_TYPES = ("qwen2", "qwen3", "llama", "mistral", "phi3", "olmo2", "granite")
_last: tuple[Any, int, list[list[tuple[int, int]]] | None] = (None, 0, None)
_flash_failed = False
# Set when this torch's varlen_attn refused fewer key/value heads than query heads: from then
# on they are repeated to match (6x the key/value bytes kept for backward on Qwen2.5-1.5B).
_gqa_repeat = False
# Attention calls per path in this process (flash varlen, sdpa per example, transformers' sdpa),
# which `tuneoff bench` records so that a figure says which kernel produced it.
calls: Counter[str] = Counter()
_cu: tuple[Any, Any, Any, int] = (None, None, None, 0)


def register() -> str:
    """Register `tuneoff_varlen` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def varlen_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """sdpa's mask, or None where its only job would be to keep packed examples apart: no
    padding mask, no sliding window, queries and keys the same positions (no cache). Without
    packing sdpa would skip that mask too (causal)."""
    from transformers.masking_utils import sdpa_mask

    offsets = (kwargs.get("q_offset", 0), kwargs.get("kv_offset", 0))
    if (
        not args
        and kwargs.get("attention_mask") is None
        and kwargs.get("local_size") is None
        and kwargs.get("q_length") == kwargs.get("kv_length")
        and all(isinstance(o, int) and o == 0 for o in offsets)
    ):
        return None
    return sdpa_mask(*args, **kwargs)


def packed_segments(
    position_ids: torch.Tensor | None, length: int
) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each example: a new one starts wherever the position id does
    not follow its predecessor. None when no row holds more than one example. Read once per
    position-id tensor (one host sync per forward, not per layer; none when the training loop
    gave the segments with `remember_segments`)."""
    global _last
    if position_ids is None or position_ids.shape[-1] != length or length < 2:
        return None
    if position_ids.device.type == "meta":  # the planner's trace: no values to read
        return None
    inference = position_ids.is_inference()  # no version counter: not cached
    ref, version, cached = _last  # one read: serving threads may replace it meanwhile
    if (
        not inference
        and ref is not None
        and ref() is position_ids
        and version == position_ids._version
    ):
        return cached
    segments = _segments_of(position_ids)
    if not inference:
        _last = (weakref.ref(position_ids), position_ids._version, segments)
    return segments


def remember_segments(position_ids: torch.Tensor, host_position_ids: torch.Tensor) -> None:
    """Cache the segments of `position_ids` (on the device) read from its host copy, so that the
    forward never waits for the device to read them."""
    global _last
    if not position_ids.is_inference():
        _last = (weakref.ref(position_ids), position_ids._version, _segments_of(host_position_ids))


def _segments_of(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    length = position_ids.shape[-1]
    starts = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    if not bool(starts.any()):
        return None
    segments = []
    for row in starts.tolist():
        cuts = [0] + [t + 1 for t, s in enumerate(row) if s] + [length]
        segments.append(list(zip(cuts[:-1], cuts[1:])))
    return segments


@torch.compiler.disable  # data-dependent Python (segment lists); compiled models call it eagerly
def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, tokens, head_dim]
    key: torch.Tensor,  # [batch, kv_heads, tokens, head_dim]
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns [batch, tokens, heads, head_dim]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    segments = None
    # Packed training batches only: no cache, no mask (varlen_mask skipped it; a padded or
    # generation batch has one), no sliding window.
    if (
        attention_mask is None
        and key.shape[2] == query.shape[2]
        and not kwargs.get("sliding_window")
    ):
        segments = packed_segments(kwargs.get("position_ids"), query.shape[2])
    if segments is not None and len(segments) != query.shape[0]:  # [1, t] position ids, b rows
        segments = segments * query.shape[0] if len(segments) == 1 else None
    if segments is None:
        calls["sdpa"] += 1
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dtype = query.dtype
    if query.is_cuda and torch.is_autocast_enabled("cuda"):  # sdpa would run in this dtype
        dtype = torch.get_autocast_dtype("cuda")
    if query.is_cuda and dtype in (torch.float16, torch.bfloat16) and not _flash_failed:
        q, k, v = (x.to(dtype) for x in (query, key, value))
        out = _flash_varlen(q, k, v, segments, scaling, dropout)
        if out is not None:
            calls["flash_varlen"] += 1
            return out, None
    calls["sdpa_per_example"] += 1
    return _sdpa_per_example(query, key, value, segments, scaling, dropout), None


def _sdpa_per_example(query, key, value, segments, scaling, dropout) -> torch.Tensor:
    """Causal sdpa on each example. `split` (not slicing): its backward is one concatenation,
    where a slice's backward would zero-fill a whole-row gradient per example. On CPU it runs
    in fp32 whatever the model's dtype: there torch's flash kernel is 1.4-2.8x slower in bf16
    (forward + backward, head_dim 32), and autocast would cast it back to bf16."""
    gqa = key.shape[1] != query.shape[1]
    dtype = value.dtype  # under autocast, rotary embeddings leave query and key in fp32
    cpu = query.device.type == "cpu"
    if cpu and torch.is_autocast_enabled("cpu"):  # sdpa would run on inputs in this dtype
        low = torch.get_autocast_dtype("cpu")
        query, key, value = (x.to(low) for x in (query, key, value))
        dtype = low
    widened: dict[int, torch.dtype] = {}  # fp32 copies' storages -> the dtype they came from
    if cpu and any(x.dtype != torch.float32 for x in (query, key, value)):
        inputs = (query, key, value)
        query, key, value = (x.float() for x in inputs)
        for low, wide in zip(inputs, (query, key, value)):
            if low.dtype != torch.float32:
                widened[wide.untyped_storage()._cdata] = low.dtype
    rows = []
    with (
        torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext(),
        _saved_narrow(widened),
    ):
        for b, row in enumerate(segments):
            lengths = [e - s for s, e in row]
            pieces = zip(*(x[b : b + 1].split(lengths, dim=2) for x in (query, key, value)))
            parts = [  # [1, l, heads, head_dim] views: the concatenation writes the output layout
                torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa
                ).transpose(1, 2)
                for q, k, v in pieces
            ]
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous())
    out = torch.cat(rows) if len(rows) > 1 else rows[0]
    return out.to(dtype)


def saves_narrow() -> bool:
    """Whether `_sdpa_per_example` would keep half-precision inputs narrow here: grad enabled,
    and either no saved-tensor hook active or lean activations' own (`lean.SavedTensors`)."""
    if not torch.is_grad_enabled():
        return False
    return lean.active_saved_tensors() is not None or lean.top_saved_hooks() is None


def _saved_narrow(widened: dict[int, torch.dtype]) -> Any:
    """While the fp32 kernel runs on fp32 copies of half-precision inputs, autograd keeps those
    inputs for backward in their own dtype (an exact round trip) instead of fp32: half the bytes
    of query, key and value per layer. Not inside another saved-tensor hook (gradient
    checkpointing's), which must see every tensor itself."""
    if not widened or not saves_narrow():
        return contextlib.nullcontext()
    saved = lean.active_saved_tensors()
    return lean.SavedTensors(widened) if saved is None else saved.narrowed(widened)


@functools.cache
def _parameters(function: Any) -> Any:
    return inspect.signature(function).parameters


def _cu_seqlens(segments: list, device: torch.device) -> tuple[torch.Tensor, int]:
    """Cumulative example lengths on `device` (int32) and the longest, made once per forward
    (the segment list is cached per position-id tensor), not once per layer."""
    global _cu
    cached = _cu  # one read: another thread may replace it meanwhile
    if cached[0] is not segments or cached[1] != device:
        lengths = [e - s for row in segments for s, e in row]
        cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        if device.type == "cuda":  # pinned: the copy does not wait for the queued kernels
            cu = cu.pin_memory().to(device, non_blocking=True)
        cached = _cu = (segments, device, cu, max(lengths))
    return cached[2], cached[3]


def _flash_varlen(query, key, value, segments, scaling, dropout) -> torch.Tensor | None:
    """One flash-attention call over all examples; None (and sdpa per example from then on)
    where this torch has no usable `varlen_attn`."""
    global _flash_failed, _gqa_repeat
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        _flash_failed = True
        return None
    params = _parameters(varlen_attn)
    if dropout or ("scale" not in params and scaling not in (None, query.shape[-1] ** -0.5)):
        return None
    batch, heads, length, dim = query.shape
    cu, longest = _cu_seqlens(segments, query.device)
    kv_heads = key.shape[1]
    # Grouped-query attention: torch's flash kernels take fewer key/value heads as they are
    # (query head h reads key/value head h // (heads / kv_heads), as repeat_interleave would
    # give), with or without an `enable_gqa` flag; repeated only if this torch refuses them.
    repeat = kv_heads != heads and _gqa_repeat and "enable_gqa" not in params
    if repeat:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    options: dict[str, Any] = {"scale": scaling} if "scale" in params else {}
    if "enable_gqa" in params:
        options["enable_gqa"] = key.shape[1] != heads
    if "is_causal" in params:
        options["is_causal"] = True
    else:
        options["window_size"] = (-1, 0)

    def flat(x: torch.Tensor) -> torch.Tensor:  # [b, h, t, d] -> [b * t, h, d]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    try:
        out = varlen_attn(flat(query), flat(key), flat(value), cu, cu, longest, longest, **options)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, TypeError, ValueError) as err:  # an older or partial varlen_attn
        if key.shape[1] != heads and not _gqa_repeat and "enable_gqa" not in params:
            _gqa_repeat = True
            log.info("varlen_attn refused %d key/value heads (%s): repeating them", kv_heads, err)
            return _flash_varlen(query, key, value, segments, scaling, dropout)
        _flash_failed = True
        log.warning("torch varlen_attn unusable here (%s): causal sdpa per example", err)
        return None
    return out.reshape(batch, length, heads, dim)
