"""Varlen attention for packed batches: used only where it applies, sdpa's results everywhere else
(padded batches, generation with a KV cache), and the CUDA flash path equal to sdpa per example."""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
from conftest import tiny_qwen2_config, toy_examples

from tuneoff import attention
from tuneoff.batching import collate, collate_packed
from tuneoff.model import use_varlen_attention


def _pair(seed: int = 0, **extra):
    """The same tiny model twice: on sdpa, and switched to varlen attention."""
    from transformers import Qwen2ForCausalLM

    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(Qwen2ForCausalLM(tiny_qwen2_config(attn_implementation="sdpa", **extra)))
    use_varlen_attention(models[1])
    return models


def test_packed_segments_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert attention.packed_segments(positions, 9) == [
        [(0, 3), (3, 5), (5, 9)],
        [(0, 6), (6, 9)],
    ]
    assert attention.packed_segments(torch.arange(9)[None], 9) is None  # one example per row
    assert attention.packed_segments(None, 9) is None


def test_mask_skipped_only_where_it_would_only_separate_packed_examples():
    common = dict(batch_size=2, q_length=8, kv_length=8, q_offset=0, kv_offset=0)
    assert attention.varlen_mask(**common, attention_mask=None) is None
    padding = torch.ones(2, 8, dtype=torch.bool)
    padding[0, 6:] = False
    assert attention.varlen_mask(**common, attention_mask=padding) is not None
    assert attention.varlen_mask(**common, attention_mask=None, local_size=4) is not None


def test_only_plain_causal_decoders_on_sdpa_switch():
    from transformers import Qwen2ForCausalLM

    eager = Qwen2ForCausalLM(tiny_qwen2_config(attn_implementation="eager"))
    use_varlen_attention(eager)
    assert eager.config._attn_implementation == "eager"
    sdpa, varlen = _pair()
    assert varlen.config._attn_implementation == attention.NAME
    assert sdpa.config._attn_implementation == "sdpa"


def test_sliding_window_configs_stay_on_sdpa():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2ForCausalLM

    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
            attn_implementation="sdpa",
        )
    )  # fmt: skip
    use_varlen_attention(mistral)
    assert mistral.config._attn_implementation == "sdpa"  # the window needs sdpa's mask
    qwen = Qwen2ForCausalLM(tiny_qwen2_config(attn_implementation="sdpa", sliding_window=16))
    assert not qwen.config.use_sliding_window  # Qwen2 keeps the window unused
    use_varlen_attention(qwen)
    assert qwen.config._attn_implementation == attention.NAME


def test_padded_batches_and_generation_equal_sdpa(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a padded or generation batch reached the per-example path")

    monkeypatch.setattr(attention, "_sdpa_per_example", refuse)
    sdpa, varlen = _pair(seed=3)
    examples = toy_examples([9, 4, 13])
    batch = collate(examples, 0)  # right padding, attention mask
    with torch.no_grad():
        a = sdpa(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = varlen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(a, b, atol=1e-6)
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])  # left padding, KV cache
    mask = (prompts != 0).long()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out_a = sdpa.generate(input_ids=prompts, attention_mask=mask, **options)
    out_b = varlen.generate(input_ids=prompts, attention_mask=mask, **options)
    assert torch.equal(out_a, out_b)


def test_one_packed_row_equals_examples_alone_in_forward_and_backward():
    _, varlen = _pair(seed=5)
    examples = toy_examples([12, 7, 19])
    packed = collate_packed(examples, 0, row_tokens=10**6)
    assert packed["input_ids"].shape == (1, 38)
    ids = packed["input_ids"][0].tolist()
    logits = varlen(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
    logits.square().sum().backward()
    packed_grads = [p.grad.clone() for p in varlen.parameters()]
    varlen.zero_grad()
    for e in examples:
        start, n = ids.index(e.input_ids[0]), len(e.input_ids)
        assert ids[start : start + n] == e.input_ids
        alone = varlen(input_ids=torch.tensor([e.input_ids])).logits
        assert torch.allclose(logits[0, start : start + n], alone[0], atol=1e-5)
        alone.square().sum().backward()
    for a, p in zip(packed_grads, varlen.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-4)


def test_cpu_per_example_attention_runs_in_fp32_under_bf16():
    """bf16 (or autocast's mix: rotary leaves query and key fp32, value bf16) is computed in fp32
    on CPU, where the flash kernel is faster in fp32, and returned in the value's dtype."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    segments = [[(0, 12), (12, 30)]]
    reference = attention._sdpa_per_example(q, k, v, segments, 8**-0.5, 0.0)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype, torch.is_autocast_enabled("cpu")))
        return real(query, key, value, **kwargs)

    cases = [(q.bfloat16(), k.bfloat16(), v.bfloat16()), (q, k, v.bfloat16())]
    for query, key, value in cases:
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
            out = attention._sdpa_per_example(query, key, value, segments, 8**-0.5, 0.0)
        assert out.dtype == torch.bfloat16 and out.shape == reference.shape
        assert torch.allclose(out.float(), reference, atol=0.05)
    assert set(seen) == {(torch.float32, torch.float32, torch.float32, False)}


@pytest.mark.parametrize("mixed", [False, True], ids=["bf16", "fp32-query-key"])
def test_cpu_per_example_attention_keeps_half_precision_inputs_narrow(mixed):
    """Autograd keeps the fp32 copies of bf16 inputs in bf16 (exact): fewer bytes alive after the
    forward, and outputs and gradients bit for bit those of keeping the fp32 copies, as happens
    inside another saved-tensor hook (gradient checkpointing's)."""
    from tuneoff.measure import TensorMemory

    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 30, 8), (1, 2, 30, 8), (1, 2, 30, 8)]
    base = [torch.randn(*shape, generator=gen) for shape in shapes]
    base = [t if mixed and i < 2 else t.bfloat16() for i, t in enumerate(base)]
    segments = [[(0, 12), (12, 30)]]
    grad = torch.randn(1, 30, 4, 8, generator=gen).bfloat16()

    def run(outer_hook: bool):
        inputs = [t.clone().requires_grad_() for t in base]
        outer = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with TensorMemory(existing=tuple(inputs)) as memory:
            with outer if outer_hook else contextlib.nullcontext():
                out = attention._sdpa_per_example(*inputs, segments, 8**-0.5, 0.0)
            alive = memory.current  # the output and what autograd keeps for backward
        out.backward(grad)
        return out, [t.grad for t in inputs], alive

    wide_out, wide_grads, wide_bytes = run(outer_hook=True)
    out, grads, narrow_bytes = run(outer_hook=False)
    assert torch.equal(out, wide_out)
    for a, b in zip(grads, wide_grads, strict=True):
        assert torch.equal(a, b)
    narrowed = sum(t.numel() * 2 for i, t in enumerate(base) if not (mixed and i < 2))
    assert narrow_bytes == wide_bytes - narrowed  # each narrowed input: 2 bytes fewer per value


@pytest.mark.parametrize("refuses_gqa", [False, True])
def test_flash_varlen_passes_grouped_kv_heads_unrepeated(monkeypatch, refuses_gqa):
    """Key/value heads go to torch's varlen_attn as they are (2 for 8 query heads here), and
    are repeated only after a varlen_attn refuses them; the results are sdpa's per example
    either way. A stand-in varlen_attn on CPU: the flash kernel itself is CUDA's (tested
    below behind the gpu marker)."""
    import torch.nn.attention.varlen as varlen_module

    seen = []

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0)  # causal
        seen.append(k.shape[1])
        if refuses_gqa and k.shape[1] != q.shape[1]:
            raise RuntimeError("Number of heads in key/value must equal number of heads in query")
        bounds = cu_q.tolist()
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                *(x[s:e].transpose(0, 1)[None] for x in (q, k, v)), is_causal=True,
                scale=scale, enable_gqa=k.shape[1] != q.shape[1],
            )[0].transpose(0, 1)
            for s, e in zip(bounds[:-1], bounds[1:])
        ]  # fmt: skip
        return torch.cat(outs)

    monkeypatch.setattr(varlen_module, "varlen_attn", fake_varlen_attn)
    monkeypatch.setattr(attention, "_gqa_repeat", False)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 40, 16, generator=gen) for h in (8, 2, 2))
    segments = [[(0, 17), (17, 25), (25, 40)]]
    loop = attention._sdpa_per_example(q, k, v, segments, 0.25, 0.0)
    for _ in range(2):
        flash = attention._flash_varlen(q, k, v, segments, 0.25, 0.0)
        torch.testing.assert_close(flash, loop)
    assert seen == ([2, 8, 8] if refuses_gqa else [2, 2])
    assert attention._gqa_repeat is refuses_gqa


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_flash_varlen_equals_sdpa_per_example(dtype):
    """The one-call flash path (torch's varlen_attn) against causal sdpa per example."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 40, 64, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(1, 2, 40, 64, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(1, 2, 40, 64, device="cuda", dtype=dtype, generator=gen, requires_grad=True)
    segments = [[(0, 17), (17, 25), (25, 40)]]
    flash = attention._flash_varlen(q, k, v, segments, 64**-0.5, 0.0)
    assert flash is not None, "torch.nn.attention.varlen.varlen_attn unusable on this GPU"
    loop = attention._sdpa_per_example(q, k, v, segments, 64**-0.5, 0.0)
    assert torch.allclose(flash.float(), loop.float(), atol=2e-2)
    flash.float().square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loop.float().square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        assert torch.allclose(g.float(), t.grad.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_loss_under_autocast_takes_flash_and_equals_padded():
    """fp32 weights under bf16 autocast (full fine-tuning's setting): one flash call per layer."""
    from tuneoff.loss import forward_loss

    sdpa, varlen = (m.cuda() for m in _pair(seed=7, hidden=64))
    examples = toy_examples([30, 12, 50, 7])

    def cuda(batch):
        return {k: v.cuda() for k, v in batch.items()}

    with torch.autocast("cuda", dtype=torch.bfloat16):
        padded = forward_loss(sdpa, cuda(collate(examples, 0)), 0)
        packed = forward_loss(varlen, cuda(collate_packed(examples, 0, 10**6)), 0)
    assert float(packed) == pytest.approx(float(padded), rel=2e-2)
    assert not attention._flash_failed


def test_inference_mode_forward_works():
    _, varlen = _pair(seed=9)
    packed = collate_packed(toy_examples([6, 9]), 0, row_tokens=10**6)
    with torch.inference_mode():
        out = varlen(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits
        plain = varlen(input_ids=packed["input_ids"]).logits  # transformers' own position ids
    assert out.shape == plain.shape == (1, 15, 768)


def test_training_step_reads_segments_once_from_the_host_copy(monkeypatch):
    """run_window hands the host position ids over: the forward never reads them on the device
    (on CUDA each read would wait for the queued kernels), and no layer reads them again."""
    from accelerate import Accelerator

    from tuneoff.train import run_window

    _, varlen = _pair(seed=11)
    reads = []
    original = attention._segments_of

    def counted(position_ids):
        reads.append(inspect.stack()[1].function)
        return original(position_ids)

    monkeypatch.setattr(attention, "_segments_of", counted)
    batch = collate_packed(toy_examples([10, 14, 6]), 0, row_tokens=10**6)
    run_window(varlen, Accelerator(cpu=True), [batch], chunk_size=0)
    assert reads == ["remember_segments"]  # once, before the forward, for a 2-layer model
