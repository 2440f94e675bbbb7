"""Lean activations (`lean.py`, `lora_layers.py`): stock forward and gradients, fewer bytes kept."""

from __future__ import annotations

import copy
from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_qwen2_config

from tuneoff import lean as lean_module
from tuneoff.config import Config
from tuneoff.lean import SavedTensors, _RMSNorm, _SwiGLU, use_lean_activations
from tuneoff.lora_layers import (
    DropoutLinear,
    _DropoutLinear,
    _LoRALinear,
    _seeded_mask,
    pack_bits,
    unpack_bits,
)
from tuneoff.measure import TensorMemory
from tuneoff.model import Runtime, prepare_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ARCHS = ["qwen2", "qwen3", "llama", "mistral", "granite", "olmo2"]


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = tiny_qwen2_config(hidden=32, layers=2, vocab=128).to_dict()
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
    keys += ("num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    config = AutoConfig.for_model(model_type, **{k: base[k] for k in keys})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn` runs (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def loss_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().pow(2).mean()


@pytest.mark.parametrize("model_type", ARCHS)
def test_lean_model_matches_stock_forward_and_gradients(model_type):
    stock = tiny_model(model_type).train()
    lean = copy.deepcopy(stock)
    counts = use_lean_activations(lean)
    layers = stock.config.num_hidden_layers
    assert counts["swiglu"] == layers  # the class list still names this architecture's MLP
    # and its norms (Qwen3: q/k norms too); OLMo 2's multiplies by the weight before the
    # cast back: left stock
    norms = {"olmo2": 0, "qwen3": 4 * layers + 1}.get(model_type, 2 * layers + 1)
    assert counts["rms_norm"] == norms
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    stock_bytes, stock_loss = saved_bytes(lambda: loss_of(stock, ids))
    lean_bytes, lean_loss = saved_bytes(lambda: loss_of(lean, ids))
    assert torch.equal(stock_loss, lean_loss)  # same forward, bit for bit
    stock_loss.backward()
    lean_loss.backward()
    for (name, a), b in zip(stock.named_parameters(), lean.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    # at least one intermediate-size fp32 tensor per layer and token fewer (silu(gate))
    tokens, inter = ids.numel(), stock.config.intermediate_size
    assert lean_bytes <= stock_bytes - layers * tokens * inter * 4
    if norms:  # and the normalized tensor of every norm whose weight trains
        assert lean_bytes <= stock_bytes - layers * tokens * (inter + 2 * 32) * 4
    with torch.no_grad():  # outside training: the stock computation
        torch.testing.assert_close(lean(input_ids=ids).logits, stock(input_ids=ids).logits)


def _lora(model: torch.nn.Module, lean: bool, runtime: Runtime, **targets) -> torch.nn.Module:
    cfg = Config(method="lora", lora_dropout=0.1, lean_activations=lean)
    return prepare_model(model, cfg.replace(**targets), runtime).train()


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize(
    "precision,targets",
    [("fp32", None), ("bf16", None), ("fp32", ALL_LINEAR), ("bf16", ALL_LINEAR)],
    ids=["fp32", "bf16", "fp32-all-linear", "bf16-all-linear"],
)
def test_lean_lora_equals_fast_dropout_on_cpu(precision, targets):
    """On CPU the lean lora_A draws FastDropout's masks: same losses and adapter gradients
    (lora_B drawn at random so that lora_A's gradients are not zero), with adapters on
    attention (the default) and on every linear layer (down_proj's input then recomputed)."""
    runtime = Runtime("cpu", precision, "test")
    keys = {"lora_target_modules": targets} if targets else {}
    stock = _lora(tiny_model("qwen2"), False, runtime, **keys)
    lean = _lora(tiny_model("qwen2"), True, runtime, **keys)
    adapters = len(targets or Config().lora_target_modules) * 2
    assert {type(m) for m in lean.modules() if isinstance(m, torch.nn.Linear)} >= {DropoutLinear}
    assert sum(isinstance(m, DropoutLinear) for m in lean.modules()) == adapters
    assert stock.state_dict().keys() == lean.state_dict().keys()  # adapters save as before
    gen = torch.Generator().manual_seed(3)
    for name, p in stock.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
    lean.load_state_dict(stock.state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (stock, lean):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            losses.append(loss_of(model, ids))
        losses[-1].backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (stock, lean)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    if precision == "fp32":
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-7)
        for name in grads[0]:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
        return
    # bf16: the two round at different points (the fused adapter adds in one addmm). Measured
    # on this case: up to 6.6% in norm, and 6.0% before the fused adapter existed. Each
    # gradient within 10% in norm (fp32 above checks the formulas strictly).
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=1e-4)
    for name, expected in grads[0].items():
        error = (grads[1][name].float() - expected.float()).norm() / expected.float().norm()
        assert error < 0.1, (name, float(error))


def test_lean_lora_saves_one_input_for_q_k_v():
    runtime = Runtime("cpu", "fp32", "test")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    sizes = []
    for lean in (False, True):
        model = _lora(tiny_model("qwen2"), lean, runtime)
        sizes.append(saved_bytes(lambda m=model: loss_of(m, ids))[0])
    # per layer and token: silu(gate) (64 floats) and two of the three dropped copies of the
    # q/k/v input (2 x 32 floats)
    assert sizes[0] - sizes[1] >= 2 * ids.numel() * (64 + 2 * 32) * 4


def test_dropout_linear_torch_masks_and_eval():
    """Away from numpy masks (CUDA, fast_dropout=false): torch.rand's draws, 1 - p kept."""
    layer = torch.nn.Linear(400, 3, bias=False)
    layer.__class__ = DropoutLinear
    layer.p, layer.fast_masks = 0.2, False
    x = torch.ones(500, 400, requires_grad=True)
    torch.manual_seed(0)
    layer(x).sum().backward()
    kept = x.grad / (layer.weight.detach().sum(0) / 0.8)  # d/dx = keep * scale * sum_j W_j
    assert abs(float(kept.mean()) - 0.8) < 0.004
    assert torch.allclose(kept, kept.round(), atol=1e-4)  # each input kept or dropped
    layer.eval()
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


def test_autograd_functions_gradcheck():
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    gate, up = torch.randn(3, 5, **kw, generator=gen), torch.randn(3, 5, **kw, generator=gen)
    assert torch.autograd.gradcheck(_SwiGLU.apply, (gate, up))
    x = torch.randn(2, 3, 6, **kw, generator=gen)
    weight, bias = torch.randn(4, 6, **kw, generator=gen), torch.randn(4, **kw, generator=gen)
    keep = torch.rand(2, 3, 6, generator=gen) > 0.3

    def dropout_linear(a, b, c):
        return _DropoutLinear.apply(a, b, c, keep, None, 0.3, torch.float64)

    assert torch.autograd.gradcheck(dropout_linear, (x, weight, bias))
    expected = torch.nn.functional.linear(x * keep / 0.7, weight, bias)
    torch.testing.assert_close(dropout_linear(x, weight, bias), expected)
    x, keep = x[:, :, :4].detach().requires_grad_(), keep[:, :, :4]  # 24 elements: bit-packed
    weight = weight[:, :4].detach().requires_grad_()
    assert torch.autograd.gradcheck(dropout_linear, (x, weight, bias))


@pytest.mark.parametrize(
    "masks,device",
    [("bits", "cpu"), ("seed", "cpu"), pytest.param("seed", "cuda", marks=[pytest.mark.gpu, CUDA])],
)
def test_fused_lora_linear_gradcheck_and_value(masks, device):
    """`_LoRALinear` is base(x) + scale * B(A(x * keep / (1 - p))): its value against that
    formula, its gradients (x, A, B) by finite differences, the base frozen; the mask kept in
    bits (24 elements) or drawn again from its seed in backward."""
    gen = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64)
    x = torch.randn(2, 3, 4, **kw, generator=gen).to(device).requires_grad_()
    weight, bias = torch.randn(5, 4, **kw).to(device), torch.randn(5, **kw).to(device)
    a = torch.randn(2, 4, **kw, generator=gen).to(device).requires_grad_()
    b = torch.randn(5, 2, **kw, generator=gen).to(device).requires_grad_()
    seed = 1234 if masks == "seed" else None
    keep = _seeded_mask(x.shape, x.device, 0.3, 1234) if seed else torch.rand(2, 3, 4) > 0.3

    def lora(x, a, b):
        return _LoRALinear.apply(x, weight, bias, a, b, keep, seed, 0.3, 4.0, torch.float64)

    expected = torch.nn.functional.linear(x, weight, bias) + 4.0 * (x * keep / 0.7) @ a.t() @ b.t()
    torch.testing.assert_close(lora(x, a, b), expected)
    assert torch.autograd.gradcheck(lora, (x, a, b))


def test_fused_lora_only_in_the_plain_training_case(monkeypatch):
    """The fused function runs for one active plain adapter while training; PEFT's own forward
    in evaluation, with the adapter disabled or merged, with two active adapters, and DoRA."""
    from peft import LoraConfig

    model = _lora(tiny_model("qwen2"), True, Runtime("cpu", "fp32", "test"))
    calls = []
    original = _LoRALinear.apply
    monkeypatch.setattr(_LoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))

    def fused_calls(context=None) -> int:
        calls.clear()
        with context or nullcontext():
            loss_of(model, ids)
        return len(calls)

    assert fused_calls() == 4 * 2  # q, k, v, o in two layers
    model.eval()
    assert fused_calls() == 0
    model.train()
    assert fused_calls(model.disable_adapter()) == 0
    model.merge_adapter()
    assert fused_calls() == 0
    model.unmerge_adapter()
    assert fused_calls() == 4 * 2
    model.add_adapter("second", LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    model.base_model.set_adapter(["default", "second"])
    assert fused_calls() == 0
    from peft import get_peft_model

    dora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1, use_dora=True)
    model = get_peft_model(tiny_model("qwen2"), dora)
    use_lean_activations(model)
    model.train()
    assert fused_calls() == 0  # DoRA reads the dropped input itself: PEFT's forward


@pytest.mark.parametrize(
    "device", ["cpu", "meta", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])]
)
def test_pack_bits_round_trip_and_layout(device):
    """Every pattern of 8 bools packs to the byte whose bit j is element j, and unpacks back;
    sizes not divisible by 8 stay boolean."""
    import itertools

    patterns = torch.tensor(list(itertools.product([False, True], repeat=8)), device=device)
    packed = pack_bits(patterns)
    assert packed.dtype == torch.uint8 and packed.shape == (256,)
    assert unpack_bits(packed, patterns.shape).shape == patterns.shape
    if device == "meta":
        return
    expected = (patterns.long() << torch.arange(8, device=device)).sum(1)
    assert torch.equal(packed.long(), expected)
    assert torch.equal(unpack_bits(packed, patterns.shape), patterns)
    gen = torch.Generator().manual_seed(0)
    for shape in [(3, 40, 24), (5, 7)]:
        keep = (torch.rand(shape, generator=gen) > 0.3).to(device)
        stored = pack_bits(keep)
        assert stored.numel() == (keep.numel() // 8 if keep.numel() % 8 == 0 else keep.numel())
        assert torch.equal(unpack_bits(stored, keep.shape), keep)


def _dropout_linear(fast_masks: bool, p: float = 0.1) -> DropoutLinear:
    layer = torch.nn.Linear(64, 8, bias=False)
    layer.__class__ = DropoutLinear
    layer.p, layer.fast_masks = p, fast_masks
    return layer.train()


def test_dropout_linear_saves_numpy_masks_in_bits_and_torch_masks_as_a_seed():
    x = torch.randn(3, 10, 64, requires_grad=True)
    weights = 64 * 8 * 4
    size, _ = saved_bytes(lambda: _dropout_linear(fast_masks=True)(x))
    assert size == x.numel() * 4 + weights + x.numel() // 8
    size, _ = saved_bytes(lambda: _dropout_linear(fast_masks=False)(x))
    assert size == x.numel() * 4 + weights  # the mask is drawn again from its seed


def test_seeded_mask_is_drawn_again_identically_in_backward():
    """Forward and backward of the seed path use one mask: the same output and gradients as
    autograd through linear(x * keep / (1 - p)) with that mask, drawn here from the same seed."""

    layer = _dropout_linear(fast_masks=False, p=0.3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    grad = torch.randn(2, 5, 8)
    torch.manual_seed(3)
    out = layer(x)
    out.backward(grad)
    torch.manual_seed(3)
    keep = _seeded_mask(x.shape, x.device, 0.3, int(torch.randint(0, 2**62, ())))
    assert 0 < int(keep.sum()) < keep.numel()
    ref_x = x.detach().clone().requires_grad_()
    ref_w = layer.weight.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(ref_x * keep / 0.7, ref_w)
    ref.backward(grad)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad)
    torch.manual_seed(4)
    assert not torch.equal(layer(x), out)  # another draw, another mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [True, False])
def test_rms_norm_gradients_match_stock_formula(dtype, weight_trains):
    """The norm computes in fp32 whatever its input: compared with autograd through the stock
    formula (transformers' Qwen2RMSNorm) rather than gradcheck, which needs fp64 throughout."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    gen = torch.Generator().manual_seed(0)
    norm = Qwen2RMSNorm(48).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=gen))
    norm.weight.requires_grad_(weight_trains)
    x = torch.randn(2, 5, 48, generator=gen).mul(3).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 5, 48, generator=gen).to(dtype)
    results = []
    for fn in (norm, lambda t: _RMSNorm.apply(t, norm.weight, norm.variance_epsilon)):
        x.grad = norm.weight.grad = None
        out = fn(x)
        out.backward(grad_out)
        results.append((out, x.grad, norm.weight.grad))
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[1][1], results[0][1], **tol)
    if weight_trains:
        torch.testing.assert_close(results[1][2], results[0][2], **tol)
    else:
        assert results[1][2] is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_swiglu_backward_in_place_same_values_fewer_bytes(dtype):
    """The backwards write results over their own temporaries: bitwise the out-of-place
    formulas, with at most 3 fp32 input-sized tensors alive in the norm's (5 before, at the
    final norm the step's peak) and 2 in SwiGLU's (3 before)."""
    from tuneoff.measure import TensorMemory

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 256, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(256, generator=gen).to(dtype).requires_grad_()
    out = _RMSNorm.apply(x, weight, 1e-6)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    with TensorMemory(existing=(x, weight, grad, out)) as memory:
        grad_x, grad_w = torch.autograd.grad(out, (x, weight), grad)
    assert memory.peak_bytes <= 3 * x.numel() * 4 + 4096
    xf = x.detach().float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
    normed = xf * rstd
    per_token = grad * normed.to(dtype)
    assert torch.equal(grad_w, per_token.reshape(-1, 256).sum(0).to(dtype))
    g = (grad * weight.detach()).float()
    dot = (g * normed).mean(-1, keepdim=True)
    assert torch.equal(grad_x, ((g - normed * dot) * rstd).to(dtype))

    gate, up = (torch.randn(4, 32, 512, generator=gen).to(dtype).requires_grad_() for _ in "gu")
    out = _SwiGLU.apply(gate, up)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    with TensorMemory(existing=(gate, up, grad, out)) as memory:
        grad_gate, grad_up = torch.autograd.grad(out, (gate, up), grad)
    assert memory.peak_bytes <= 2 * gate.nbytes
    assert torch.equal(grad_up, grad * torch.nn.functional.silu(gate.detach()))
    assert torch.equal(grad_gate, torch.ops.aten.silu_backward(grad * up.detach(), gate.detach()))


@pytest.mark.parametrize("method,fast", [("lora", True), ("lora", False), ("full", True)])
def test_checkpointed_layers_recompute_the_same_masks_and_gradients(method, fast):
    """Gradient checkpointing recomputes each layer in backward: the lean functions must save
    and draw the same (dropout masks, numpy's or seeded torch's, replayed from torch's RNG
    state), or the gradients drift."""
    runtime = Runtime("cpu", "fp32", "test")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        cfg = Config(
            method=method,
            lora_dropout=0.1,
            gradient_checkpointing=checkpointing,
            fast_dropout=fast,
        )
        model = prepare_model(tiny_model("qwen2"), cfg, runtime).train()
        torch.manual_seed(5)
        loss_of(model, ids).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_saved_tensors_keep_one_cast_of_a_source_and_recompute_a_product():
    """Under autocast with fp32 weights each linear casts its input itself: `SavedTensors`
    keeps one half-precision copy per source tensor, and a `recomputed` product as its recipe;
    the gradients are bitwise those of the stock saves."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=gen, requires_grad=True)
    w = [torch.randn(16, 16, generator=gen, requires_grad=True) for _ in range(3)]

    def forward(saved: SavedTensors | None) -> torch.Tensor:
        with saved or nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16):
            h = x * 1.5  # fp32: the source that both linears cast
            a, b = torch.nn.functional.linear(h, w[0]), torch.nn.functional.linear(h, w[1])
            product = a * b
            with saved.recomputed(product, torch.mul, a, b) if saved else nullcontext():
                return torch.nn.functional.linear(product, w[2])

    def run(saved: SavedTensors | None) -> tuple[int, list[torch.Tensor]]:
        with TensorMemory() as memory:
            out = forward(saved)
            kept = memory.current  # what autograd keeps, and out
        out.float().pow(2).sum().backward()
        grads = [t.grad.clone() for t in (x, *w)]
        for t in (x, *w):
            t.grad = None
        return kept, grads

    stock_bytes, stock = run(None)
    lean_bytes, grads = run(SavedTensors())
    # one bf16 copy of h (6 x 16) and the bf16 product (6 x 16) fewer
    assert stock_bytes - lean_bytes == 2 * 6 * 16 * 2
    for expected, got in zip(stock, grads):
        assert torch.equal(expected, got)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
def test_full_model_under_autocast_keeps_fewer_bytes_with_the_same_gradients(monkeypatch, device):
    """A whole tiny model, full fine-tuning under bf16 autocast (fp32 weights): the shared
    casts of the q/k/v and gate/up inputs and the recomputed SwiGLU product save their bytes;
    loss and every gradient are bitwise those without them."""
    cfg = Config(method="full")
    runtime = Runtime(device, "bf16", "test")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for shared in (False, True):
        if not shared:
            monkeypatch.setattr(lean_module, "_cast_source", lambda node: None)
            monkeypatch.setattr(SavedTensors, "recomputed", lambda self, *a: nullcontext())
        model = prepare_model(tiny_model("qwen2").to(device), cfg, runtime).train()
        with TensorMemory(model, (ids,)) as memory:
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_of(model, ids)
            kept = memory.current
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((kept, loss.detach(), grads))
        monkeypatch.undo()
    (stock_bytes, stock_loss, stock), (lean_bytes, lean_loss, grads) = results
    assert torch.equal(stock_loss, lean_loss)
    assert stock.keys() == grads.keys()
    for name in stock:
        assert torch.equal(stock[name], grads[name]), name
    hidden, inter, layers = 32, 64, 2
    # per layer and token, in bf16: two of three q/k/v input copies, one of two gate/up input
    # copies, the SwiGLU product
    assert stock_bytes - lean_bytes == layers * ids.numel() * (3 * hidden + inter) * 2


def test_saved_tensors_step_aside_for_another_hook():
    """Inside another saved-tensor hook (checkpointing's, a profiler's) the model's forward
    does not push its own: the outer hook sees every saved tensor."""
    model = prepare_model(tiny_model("qwen2"), Config(method="full"), Runtime("cpu", "fp32", "t"))
    model.train()
    inside = []
    model.model.layers[0].mlp.register_forward_hook(
        lambda *_: inside.append(lean_module.active_saved_tensors())
    )
    ids = torch.randint(0, 128, (1, 8))
    loss_of(model, ids)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        loss_of(model, ids)
    with torch.no_grad():
        loss_of(model, ids)
    assert isinstance(inside[0], SavedTensors) and inside[1:] == [None, None]


@pytest.mark.parametrize(
    "method,targets,hooked",
    [("full", None, 1), ("lora", ["q_proj", "v_proj"], 0), ("lora", ["q_proj", "down_proj"], 1)],
)
def test_saved_tensors_hooks_only_where_weight_inputs_are_kept(method, targets, hooked):
    """Frozen base weights keep no inputs for their gradients: with adapters on attention only
    there is nothing to share or recompute, and the hooks (a Python call per saved tensor)
    are left out; full fine-tuning and an adapter on down_proj get them."""
    cfg = Config(method=method, lora_target_modules=targets or Config().lora_target_modules)
    model = prepare_model(tiny_model("qwen2"), cfg.replace(lean_activations=False))
    assert lean_module.use_lean_activations(model)["saved_tensors"] == hooked


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compiled_lean_model_matches_eager(method, monkeypatch):
    """Under torch.compile the lean paths take their graph-friendly branches (PEFT's forward
    with a kept dropout mask, no saved-tensor hooks): loss and gradients match eager. Dropout
    p = 1e-6 keeps the lean lora_A in play while dropping nothing in either run."""
    from tuneoff.model import compile_model

    cfg = Config(method=method, lora_dropout=1e-6)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    calls = []
    original = _LoRALinear.apply
    monkeypatch.setattr(_LoRALinear, "apply", lambda *a: calls.append(1) or original(*a))
    for compiled in (False, True):
        model = prepare_model(tiny_model("qwen2"), cfg, Runtime("cpu", "fp32", "test")).train()
        if compiled:
            compile_model(model)
            calls.clear()
        loss = loss_of(model, ids)
        if compiled:
            assert not calls  # graphs take PEFT's forward
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (eager_loss, eager), (compiled_loss, grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert eager.keys() == grads.keys() and eager
    for name in eager:
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@CUDA
def test_fused_lora_on_cuda_matches_peft_under_bf16_autocast():
    """The fused adapter on CUDA (seeded torch masks, uint8 mask operands, bf16 autocast over
    bf16 frozen weights and fp32 adapters) against PEFT's forward: dropout p = 1e-6 drops
    nothing in either, so only rounding differs."""
    runtime = Runtime("cuda", "bf16", "test")
    cfg = Config(method="lora", lora_dropout=1e-6)
    models = []
    for lean in (False, True):
        model = prepare_model(
            tiny_model("qwen2").cuda(), cfg.replace(lean_activations=lean), runtime
        )
        models.append(model.train())
    gen = torch.Generator().manual_seed(3)
    for name, p in models[0].named_parameters():
        if "lora_B" in name:
            p.data = (torch.randn(p.shape, generator=gen) * 0.1).to(p)
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1)).cuda()
    for model in models:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_of(model, ids).backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, expected in grads[0].items():
        error = (grads[1][name].float() - expected.float()).norm() / expected.float().norm()
        assert error < 0.1, (name, float(error))
