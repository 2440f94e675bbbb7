"""Models: the exact Qwen2.5-1.5B parameter counts on the meta device, prepare_model per method,
and the device/precision choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import tuneoff
from tuneoff import model as model_module
from tuneoff.config import Config
from tuneoff.model import (
    ModelError,
    Runtime,
    choose_runtime,
    count_parameters,
    prepare_model,
    weights_dtype,
)

ARCH = Path(tuneoff.__file__).parent / "archs" / "qwen2.5-1.5b-instruct.json"


def meta_qwen_1_5b() -> torch.nn.Module:
    config = AutoConfig.for_model(**json.loads(ARCH.read_text()))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def test_qwen2_5_1_5b_parameter_count_on_meta_device():
    counts = count_parameters(meta_qwen_1_5b())
    assert counts["total"] == 1_543_714_304  # tied embeddings counted once


def test_lora_r8_qkvo_adds_the_reference_share():
    with torch.device("meta"):
        model = prepare_model(meta_qwen_1_5b(), Config(method="lora"))
    counts = count_parameters(model)
    assert counts["trainable"] == 2_179_072
    assert counts["total"] == 1_543_714_304 + 2_179_072
    assert round(counts["trainable_pct"], 3) == 0.141  # the reference's "0.14%"


def test_prepare_model_per_method(tiny_model_dir):
    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    full = prepare_model(fresh(), Config(method="full"))
    assert all(p.requires_grad for p in full.parameters())
    base = prepare_model(fresh(), Config(method="base"))
    assert not any(p.requires_grad for p in base.parameters())
    lora = prepare_model(fresh(), Config(method="lora", lora_target_modules=["q_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)


def test_lora_targets_that_do_not_exist_are_a_clear_error(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ModelError, match="lora_target_modules"):
        prepare_model(model, Config(method="lora", lora_target_modules=["nope_proj"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_runtime_on_cpu_falls_back_to_fp32_and_says_why():
    runtime = choose_runtime(Config(precision="fp16"))
    assert (runtime.device, runtime.precision) == ("cpu", "fp32")
    assert "fp16" in runtime.reason
    with pytest.raises(ModelError, match="CUDA is not available"):
        choose_runtime(Config(device="cuda"))


@pytest.mark.parametrize("native", [True, False])
def test_cpu_runtime_is_fp32_unless_bf16_is_asked_or_pays(native, monkeypatch):
    monkeypatch.setattr(model_module, "cpu_has_bf16", lambda: native)
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    small = model_module.CPU_BF16_MIN_TOKENS - 1
    for tokens in (None, small):
        auto = choose_runtime(Config(device="cpu"), tokens)
        assert (auto.precision, auto.mixed_precision) == ("fp32", "no")
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # fp32 runs leave oneDNN alone
    large = choose_runtime(Config(device="cpu"), model_module.CPU_BF16_MIN_TOKENS)
    assert large.precision == ("bf16" if native else "fp32")  # never emulated bf16 by default
    asked = choose_runtime(Config(device="cpu", precision="fp32"), 10**6)
    assert asked.precision == "fp32"
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    asked = choose_runtime(Config(device="cpu", precision="bf16"))
    assert (asked.precision, asked.mixed_precision) == ("bf16", "bf16")
    assert ("emulated" in asked.reason) != native
    # bf16 runs bound oneDNN's per-shape caches, or packed rows would grow memory every step
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "32"
    assert os.environ["LRU_CACHE_CAPACITY"] == "1"
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "7")  # a user's setting wins
    choose_runtime(Config(device="cpu", precision="bf16"))
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "7"
    bf16 = Runtime("cpu", "bf16", "test")
    assert weights_dtype(Config(method="lora"), bf16) == torch.bfloat16  # frozen: never re-cast
    assert weights_dtype(Config(method="full"), bf16) == torch.float32  # fp32 master weights


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runtime_on_cuda_honours_fp16():
    runtime = choose_runtime(Config(precision="fp16"))
    assert (runtime.device, runtime.precision, runtime.mixed_precision) == ("cuda", "fp16", "fp16")


def test_fast_dropout_masks_like_torch_and_is_seeded():
    from tuneoff.lora_layers import FastDropout

    drop = FastDropout(0.1)
    x = torch.ones(500, 400, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    keep = y != 0
    assert abs(float(keep.float().mean()) - 0.9) < 0.003  # 200k draws: 4 standard deviations
    assert torch.allclose(y[keep], torch.full_like(y[keep], 1 / 0.9))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(x * keep / 0.9)/dx = keep / 0.9
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # the same torch seed, the same mask
    assert not torch.equal(drop(x), y)
    drop.eval()
    assert drop(x) is x


def test_prepare_model_installs_fast_dropout_on_cpu_only_when_asked(tiny_model_dir):
    from tuneoff.lora_layers import FastDropout
    from tuneoff.model import load_model, prepare_model

    def dropouts(fast: bool, device: str = "cpu") -> set[type]:
        runtime = Runtime(device, "fp32", "test")
        cfg = Config(method="lora", fast_dropout=fast, lean_activations=False)
        model = prepare_model(load_model(str(tiny_model_dir)), cfg, runtime)
        return {type(m) for m in model.modules() if isinstance(m, torch.nn.Dropout)}

    assert dropouts(True) == {FastDropout}
    assert dropouts(False) == {torch.nn.Dropout}
    assert dropouts(True, "cuda") == {torch.nn.Dropout}  # torch's fused dropout there


def test_compile_model_wraps_in_place_with_room_for_recompiles(tiny_model_dir):
    import torch._dynamo

    from tuneoff.model import compile_model, load_model

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    before = getattr(config, name)
    try:
        setattr(config, name, 8)  # dynamo's default
        model = prepare_model(load_model(str(tiny_model_dir)), Config(method="lora"))
        keys = set(model.state_dict())
        compile_model(model)
        assert getattr(config, name) >= 64
        assert model._compiled_call_impl is not None  # compiled lazily, at the first call
        assert set(model.state_dict()) == keys
    finally:
        setattr(config, name, before)
