"""The memory planner: exact arithmetic for known models, predicted vs measured tensor memory on
tiny models, lean options (chunked loss, lean optimizers, QLoRA), and `tuneoff plan`'s CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_qwen2_config

from tuneoff.cli import main
from tuneoff.config import Config, ConfigError, parse_size
from tuneoff.loss import forward_loss, forward_stats, loss_sum
from tuneoff.measure import measure
from tuneoff.model import Runtime, count_parameters, load_arch_config, prepare_model
from tuneoff.optim import LeanAdamW, make_optimizer, optimizer_state_bytes
from tuneoff.plan import GIB, predict

QWEN_1_5B = 1_543_714_304
LORA_QKVO_R8 = 2_179_072
CPU = Runtime("cpu", "fp32", "test")
GPU_BF16 = Runtime("cuda", "bf16", "test")
CPU_BF16 = Runtime("cpu", "bf16", "test")


def tiny_arch():
    return tiny_qwen2_config(hidden=64)


def test_sizes_parse_and_bad_sizes_are_one_clear_error():
    assert parse_size("16GiB") == 16 * GIB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * GIB)
    assert parse_size("4096B") == 4096
    for bad in ("sixteen", "16 parsecs", "-3GiB", "0GiB", ""):
        with pytest.raises(ConfigError, match="memory size|above zero"):
            parse_size(bad, "--gpu-memory")
    for bare in ("16", 16, "0.5"):  # was read as bytes: `--gpu-memory 16` "fit" 0.0 GiB
        with pytest.raises(ConfigError, match="no unit"):
            parse_size(bare, "--gpu-memory")


def test_weights_gradients_and_optimizer_states_are_exact_for_qwen_1_5b():
    arch = load_arch_config("Qwen/Qwen2.5-1.5B-Instruct")
    # rotary inv_freq and original_inv_freq: head_dim / 2 fp32 values each
    rope_buffer = 2 * 4 * (arch.hidden_size // arch.num_attention_heads // 2)
    base = dict(batch_size=1, max_seq_len=8, eval_batch_size=1, grad_accum=1)
    full = predict(Config(method="full", **base), arch, CPU, both_checkpointing=False)
    assert full.components["weights"] == 4 * QWEN_1_5B + rope_buffer
    assert full.components["gradients"] == 4 * QWEN_1_5B
    assert full.components["optimizer"] == 8 * QWEN_1_5B
    lean = predict(
        Config(method="full", optimizer="adamw_lean", weights_dtype="bf16", **base),
        arch,
        CPU,
        both_checkpointing=False,
    )
    assert lean.components["weights"] == 2 * QWEN_1_5B + rope_buffer // 2  # buffers in bf16
    assert lean.components["gradients"] == 2 * QWEN_1_5B
    assert lean.components["optimizer"] == 4 * QWEN_1_5B
    lora = predict(Config(method="lora", **base), arch, GPU_BF16, both_checkpointing=False)
    assert lora.components["weights"] == 2 * QWEN_1_5B + 4 * LORA_QKVO_R8 + rope_buffer // 2
    assert lora.components["gradients"] == 4 * LORA_QKVO_R8
    assert lora.components["optimizer"] == 8 * LORA_QKVO_R8


def test_reference_recipe_lora_near_13_4_gib_and_full_does_not_fit_16():
    """The reference: fp32 weights, fp16 autocast, batch 4 x 256 padded, full-vocab logits."""
    arch = load_arch_config("qwen2.5-1.5b")
    recipe = dict(
        batching="padded",
        loss_chunk_size=0,
        weights_dtype="fp32",
        fused_optimizer=False,
        batch_size=4,
        max_seq_len=256,
        eval_batch_size=4,
    )
    fp16 = Runtime("cuda", "fp16", "test")
    lora = predict(Config(method="lora", **recipe), arch, fp16, both_checkpointing=False)
    assert 12.0 * GIB < lora.peak_allocated < 14.8 * GIB  # measured: 13.4 (4080), 13.7 (H200)
    full = predict(Config(method="full", **recipe), arch, fp16, both_checkpointing=False)
    assert full.device_total > 16 * GIB


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_prediction_within_10_percent_of_measured_tensor_memory(method, checkpointing):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    arch = tiny_arch()
    for chunk in (0, 64):
        cfg = Config(
            method=method,
            gradient_checkpointing=checkpointing,
            batch_size=4,
            grad_accum=2,
            max_seq_len=64,
            eval_batch_size=8,
            loss_chunk_size=chunk,
            batching="longest",
        )
        predicted = predict(cfg, arch, CPU, both_checkpointing=False).components
        measured = measure(cfg, arch, CPU)
        keys = ["weights", "gradients", "optimizer", "activations", "logits_and_loss"]
        for key in [*keys, "evaluation"]:
            assert predicted[key] == pytest.approx(measured[key], rel=0.10, abs=1024), key
        total_p = sum(predicted[k] for k in keys)
        total_m = sum(measured[k] for k in keys)
        assert total_p == pytest.approx(total_m, rel=0.10)


@pytest.mark.parametrize(
    "method, runtime, fast",
    [
        ("lora", CPU, True),
        ("full", CPU, True),
        ("lora", CPU_BF16, True),
        ("full", CPU_BF16, True),  # fp32 weights under autocast: fp32 residual, a cast per linear
        ("lora", CPU, False),  # torch's dropout masks, drawn again from their seed (as on GPU)
    ],
    ids=["lora-fp32", "full-fp32", "lora-bf16", "full-bf16", "lora-seeded-masks"],
)
def test_packed_prediction_within_10_percent_on_cpu(method, runtime, fast):
    """Packed rows on varlen attention, in fp32 and under CPU bf16 autocast (where attention
    runs on fp32 copies of query, key and value, as the trace must count). Measured tensors
    include autocast's weight casts, which the prediction lists apart."""
    arch = tiny_arch()
    cfg = Config(method=method, batch_size=4, max_seq_len=64, eval_batch_size=8, fast_dropout=fast)
    assert cfg.batching == "packed" and cfg.packed_attention == "varlen"
    predicted = predict(cfg, arch, runtime, both_checkpointing=False).components
    measured = measure(cfg, arch, runtime)
    for key in ["weights", "gradients", "optimizer"]:
        assert predicted[key] == pytest.approx(measured[key], rel=0.10, abs=1024), key
    step = ["activations", "logits_and_loss"]
    total_p = sum(predicted[k] for k in [*step, "autocast_copies"])
    assert total_p == pytest.approx(sum(measured[k] for k in step), rel=0.02)  # traced
    if runtime.precision == "fp32":
        assert predicted["autocast_copies"] == 0
        for key in step:
            assert predicted[key] == pytest.approx(measured[key], rel=0.10, abs=1024), key


def test_token_budget_bounds_the_predicted_micro_batch():
    """With `micro_batch_tokens` the worst micro-batch is the budget's tokens, not batch_size
    full-length examples: a budget of two examples' tokens predicts what micro-batches of
    two examples do, a budget between two and three lies between them."""
    arch = tiny_arch()

    def step_bytes(**keys):
        cfg = Config(
            **{"method": "lora", "batch_size": 4, "grad_accum": 2, "max_seq_len": 64, **keys}
        )
        c = predict(cfg, arch, CPU, both_checkpointing=False).components
        return c["activations"] + c["logits_and_loss"]

    two, three, four = (step_bytes(batch_size=n, grad_accum=8 // n) for n in (2, 3, 4))
    assert step_bytes(micro_batch_tokens=128) == two < three < four
    assert two < step_bytes(micro_batch_tokens=160) < three
    assert step_bytes(micro_batch_tokens=4096) == step_bytes(batch_size=8, grad_accum=1)


def test_checkpointing_and_chunking_lower_the_prediction():
    arch = load_arch_config("qwen2.5-0.5b")
    cfg = Config(method="lora", batch_size=4, max_seq_len=256, eval_batch_size=4)
    plain = predict(cfg.replace(loss_chunk_size=0), arch, GPU_BF16)
    lean = predict(cfg.replace(gradient_checkpointing=True), arch, GPU_BF16)
    by_ckpt = plain.activations_by_checkpointing
    assert by_ckpt["on"] < by_ckpt["off"] / 4
    assert lean.components["logits_and_loss"] < plain.components["logits_and_loss"] / 2
    assert lean.peak_allocated < plain.peak_allocated


def test_chunked_loss_equals_full_logits_loss_and_gradients(tiny_model_dir):
    from tuneoff.model import load_model

    for method in ("lora", "full"):
        torch.manual_seed(0)
        ids = torch.randint(3, 700, (3, 24))
        labels = ids.clone()
        labels[:, :9] = -100
        labels[2, 20:] = -100
        batch = {"input_ids": ids, "labels": labels}
        grads, stats_by_chunk = [], []
        for chunk in (0, 7):
            torch.manual_seed(0)
            model = prepare_model(load_model(str(tiny_model_dir)), Config(method=method))
            loss = forward_loss(model, batch, chunk)
            loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            stats = forward_stats(model, batch, chunk)
            stats_by_chunk.append(stats)
            assert stats[0] == pytest.approx(float(loss), rel=1e-5)
            assert stats[2] == int((labels[:, 1:] != -100).sum())
            if chunk == 0:
                reference = float(loss_sum(model(input_ids=ids).logits, labels))
                assert float(loss) == pytest.approx(reference, rel=1e-6)
        assert stats_by_chunk[0][1:] == stats_by_chunk[1][1:]  # same correct and token counts
        assert grads[0].keys() == grads[1].keys() and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_slices_the_fp32_head_gradient_under_autocast(monkeypatch):
    """fp32 weights under bf16 autocast: the head's fp32 gradient gathers bf16 products a
    vocabulary slice at a time; same gradients as in one product, a smaller temporary."""
    from transformers import AutoModelForCausalLM

    from tuneoff import loss as loss_module
    from tuneoff.measure import TensorMemory

    arch = tiny_qwen2_config(hidden=32, vocab=768)
    ids = torch.randint(3, 700, (2, 40), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone()}
    grads, peaks = [], []
    for vocab_slice in (10**6, 100):
        monkeypatch.setattr(loss_module, "VOCAB_SLICE", vocab_slice)
        torch.manual_seed(0)
        model = prepare_model(AutoModelForCausalLM.from_config(arch), Config(method="full"))
        with TensorMemory(model, tuple(batch.values())) as memory:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                part = forward_loss(model, batch, 16)
            part.backward()
        peaks.append(memory.peak_bytes)
        grads.append(model.get_output_embeddings().weight.grad)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    assert peaks[1] <= peaks[0] - (768 - 100) * 32 * 2  # the whole head's bf16 product


def test_lean_optimizers_hold_fewer_state_bytes_and_track_adamw():
    torch.manual_seed(0)
    a, y = torch.randn(64, 4096), torch.randn(64)
    results = {}
    for name in ("adamw", "adamw_lean", "adamw8bit"):
        if name == "adamw8bit":
            pytest.importorskip("bitsandbytes")
        w = torch.nn.Linear(4096, 1, bias=False)
        torch.nn.init.zeros_(w.weight)
        opt = make_optimizer(w, Config(optimizer=name, lr=1e-3), "cpu")
        for _ in range(200):
            loss = F.mse_loss(w(a).squeeze(1), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        results[name] = (float(F.mse_loss(w(a).squeeze(1), y)), optimizer_state_bytes(opt))
    assert results["adamw_lean"][1] <= results["adamw"][1] / 2 + 64
    assert results["adamw8bit"][1] < results["adamw"][1] / 3
    assert results["adamw_lean"][0] == pytest.approx(results["adamw"][0], rel=0.02)


def test_lean_adamw_updates_bf16_weights_that_round_to_nearest_would_freeze():
    """lr x update far below bf16's resolution at 1.0: plain rounding never moves the weight;
    stochastic rounding moves it by the right amount on average."""
    w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    opt = LeanAdamW([w], lr=1e-4)
    for _ in range(50):
        w.grad = torch.ones_like(w)
        opt.step()
    assert float(w.float().mean()) == pytest.approx(1 - 50 * 1e-4, abs=1e-3)


def test_qlora_trains_and_its_base_stays_4bit(tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    from tuneoff.model import load_model

    torch.manual_seed(0)
    model = prepare_model(load_model(str(tiny_model_dir)), Config(method="qlora"))
    model.train()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == "Linear4bit"
    lora = prepare_model(load_model(str(tiny_model_dir)), Config(method="lora"))
    assert count_parameters(model) == count_parameters(lora)  # 4-bit weights counted as weights
    base_before = layer.base_layer.weight.data.clone()
    assert base_before.dtype == torch.uint8
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(model, Config(lr=1e-2), "cpu")
    ids = torch.randint(3, 700, (4, 16))
    losses = []
    for step in range(8):
        if step == 4:  # an evaluation mid-training must not break the next training steps
            model.eval()
            forward_stats(model, {"input_ids": ids, "labels": ids}, 512)
            model.train()
        loss = forward_loss(model, {"input_ids": ids, "labels": ids}, 512) / ids.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert torch.equal(layer.base_layer.weight.data, base_before)
    changed = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(
        not torch.equal(dict(model.named_parameters())[n], lora_before[n])
        for n in changed
        if "lora_B" in n
    )


def test_fp16_full_weights_are_refused():
    from tuneoff.model import weights_dtype

    with pytest.raises(ConfigError, match="weights_dtype=fp16"):
        weights_dtype(Config(method="full", weights_dtype="fp16"), CPU)


def test_plan_cli_prints_every_component_and_advice(capsys):
    assert (
        main(
            [
                "plan",
                "--preset",
                "seed",
                "--gpu-memory",
                "16GiB",
                "--methods",
                "full",
                "loss_chunk_size=0",
                "precision=fp16",
                "weights_dtype=fp32",
                "lean_activations=false",  # the advice turns them back on
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for label in (
        "weights",
        "gradients",
        "optimizer states",
        "activations",
        "logits and loss",
        "autocast weight copies",
        "evaluation batch",
        "fits 16.0 GiB",
        "NO",
    ):
        assert label in out
    assert "full fits with:" in out and "lean_activations=true" in out
    assert main(["plan", "--preset", "seed", "--gpu-memory", "15GiB", "--methods", "full"]) == 0
    assert "gradient_checkpointing=true  (needs" in capsys.readouterr().out


def test_plan_cli_json_and_measure_on_a_tiny_model(capsys, tiny_model_dir):
    assert (
        main(
            [
                "plan",
                "--model",
                str(tiny_model_dir),
                "--methods",
                "lora,full",
                "--json",
                "--measure",
                "device=cpu",
                "max_seq_len=32",
                "batch_size=2",
                "eval_batch_size=2",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result["arms"]) == {"lora", "full"}
    for method in ("lora", "full"):
        arm = result["measured"][method]
        assert arm["predicted_gib"]["optimizer"] == pytest.approx(
            arm["measured_gib"]["optimizer"], rel=0.01
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--gpu-memory", "lots"], "not a memory size"),
        (["plan", "--model", "no-such-org/no-such-model-xyz"], "no shipped config"),
        (["plan", "--model", "/nonexistent/config.json"], "no shipped config"),
        (["compare", "--memory-budget", "16 bananas"], "not a memory size"),
        (["plan", "--gpu-memory", "16"], "no unit"),
        (["compare", "--model", "/nonexistent/model", "--memory-budget", "16"], "no unit"),
        (["plan", "--methods", ""], "'methods'"),
        (["compare", "--model", "/nonexistent/model", "--methods", ""], "'methods'"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2(argv, message, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
