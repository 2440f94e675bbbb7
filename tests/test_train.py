"""The training loop: LoRA and full invariants, accumulation invariance, partial windows,
max_steps, and resume from an epoch checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from tuneoff.batching import collate
from tuneoff.cli import main
from tuneoff.config import Config
from tuneoff.data import tokenize_split
from tuneoff.embedded import generate_records
from tuneoff.model import load_model, load_tokenizer, prepare_model
from tuneoff.train import plan_steps, run_window, train


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return tokenize_split(generate_records(40, seed=5), tokenizer, Config())[0], tokenizer


def make_cfg(tiny_model_dir, **changes) -> Config:
    base = dict(
        model=str(tiny_model_dir),
        epochs=1,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=0,
        lr_schedule="constant",
        eval_batch_size=16,
        gen_examples=0,
        save_checkpoints=False,
        lora_dropout=0.0,
    )
    return Config(**{**base, **changes})


def run_train(cfg: Config, examples, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = prepare_model(load_model(cfg.model), cfg)
    (tmp_path / cfg.method).mkdir(parents=True, exist_ok=True)
    data = {"train": examples, "val": examples[:8]}
    stats = train(
        model,
        Accelerator(cpu=True),
        data,
        cfg,
        tmp_path / cfg.method,
        tokenizer.pad_token_id,
        resume=False,
    )
    return model, stats


def test_lora_leaves_base_weights_bit_identical_and_changes_the_adapter(
    tiny_model_dir, examples, tmp_path
):
    cfg = make_cfg(tiny_model_dir, method="lora", max_steps=3)
    original = load_model(cfg.model).state_dict()
    torch.manual_seed(0)
    initial = {
        n: p.detach().clone()
        for n, p in prepare_model(load_model(cfg.model), cfg).named_parameters()
        if p.requires_grad
    }
    model, stats = run_train(cfg, *examples, tmp_path)
    assert stats["optimizer_steps"] == 3
    after = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert after.keys() == initial.keys()
    assert all(not torch.equal(after[n], initial[n]) for n in after), "every adapter weight moves"
    base = model.unload().state_dict()  # the base model without the adapter
    assert base.keys() == original.keys()
    assert all(torch.equal(base[k], original[k]) for k in original)


def test_full_changes_every_trainable_weight(tiny_model_dir, examples, tmp_path):
    cfg = make_cfg(tiny_model_dir, method="full", max_steps=2)
    original = load_model(cfg.model).state_dict()
    model, _ = run_train(cfg, *examples, tmp_path)
    for name, param in model.named_parameters():
        assert param.requires_grad
        assert not torch.equal(param, original[name]), name


def test_accumulation_4x1_gives_the_same_gradient_as_batch_4(tiny_model_dir, examples):
    train_examples, tokenizer = examples
    chosen = train_examples[:4]
    assert len({len(e.input_ids) for e in chosen}) > 1  # unequal lengths make the test bite
    accelerator = Accelerator(cpu=True)

    def grads(micro):
        torch.manual_seed(0)
        model = prepare_model(load_model(str(tiny_model_dir)), Config(method="full"))
        run_window(model, accelerator, micro)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    pad = tokenizer.pad_token_id
    one_batch = grads([collate(chosen, pad)])
    four_micro = grads([collate([e], pad) for e in chosen])
    for name in one_batch:
        torch.testing.assert_close(four_micro[name], one_batch[name], rtol=1e-4, atol=1e-6)
    # The naive recipe (mean loss per micro-batch, divided by 4) gives another gradient.
    torch.manual_seed(0)
    model = prepare_model(load_model(str(tiny_model_dir)), Config(method="full"))
    for e in chosen:
        batch = collate([e], pad)
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1)
        )
        (loss / 4).backward()
    naive = dict(model.named_parameters())
    assert any(not torch.allclose(naive[n].grad, one_batch[n], rtol=1e-3) for n in one_batch)


def test_the_last_partial_window_is_kept(tiny_model_dir, examples, tmp_path):
    train_examples, tokenizer = examples
    # 10 examples, batch 4 -> 3 batches; accumulation 2 -> windows of 2 and 1 batches.
    cfg = make_cfg(tiny_model_dir, method="lora")
    assert plan_steps(10, cfg, world_size=1) == (2, 2)
    _, stats = run_train(cfg, train_examples[:10], tokenizer, tmp_path)
    assert stats["optimizer_steps"] == 2
    assert stats["train_supervised_tokens"] == sum(
        sum(lab != -100 for lab in e.labels[1:]) for e in train_examples[:10]
    )


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_after_an_interruption_matches_an_uninterrupted_run(
    method, tiny_model_dir, alpaca_file, tmp_path, monkeypatch
):
    args = [
        "train",
        "--method",
        method,
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(alpaca_file),
        "epochs=2",
        "batch_size=8",
        "grad_accum=2",
        "gen_examples=0",
        "lr=1e-2",
        "warmup_steps=2",
        "--no-report",
    ]
    assert main([*args, "--output-dir", str(tmp_path / "straight")]) == 0
    monkeypatch.setenv("TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH", "1")
    assert main([*args, "--output-dir", str(tmp_path / "resumed")]) == 130
    assert not (tmp_path / "resumed" / method / "summary.json").exists()
    monkeypatch.delenv("TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH")
    assert main([*args, "--output-dir", str(tmp_path / "resumed")]) == 2  # exists: needs --resume
    assert main([*args, "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    weights = "adapter/adapter_model.safetensors" if method == "lora" else "model/model.safetensors"
    straight = load_file(tmp_path / "straight" / method / weights)
    resumed = load_file(tmp_path / "resumed" / method / weights)
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = [
        json.loads(x)
        for x in (tmp_path / "resumed" / method / "metrics.jsonl").read_text().split("\n")
        if x
    ]
    steps = [r["step"] for r in rows if r["event"] == "train"]
    assert steps == sorted(set(steps))  # no step logged twice
    summary = json.loads((tmp_path / "resumed" / method / "summary.json").read_text())
    assert summary["training"]["epochs_completed"] == 2
    assert len(summary["training"]["epoch_times_s"]) == 2


def test_resume_after_a_max_steps_stop_goes_on_mid_epoch(tiny_model_dir, alpaca_file, tmp_path):
    """A run stopped by --max-steps in the middle of an epoch, resumed with more steps, trains
    the rest of that epoch, as one run with the larger --max-steps does: the same lr schedule
    (it spans the planned epochs, whatever --max-steps) and the same dropout masks (the data
    loader draws nothing from torch's random state)."""
    args = ["train", "--method", "lora", "--model", str(tiny_model_dir), "--dataset",
            str(alpaca_file), "--no-report", "batch_size=8", "grad_accum=1", "gen_examples=0",
            "lr=1e-2", "warmup_steps=2", "lora_dropout=0.3"]  # fmt: skip
    assert main([*args, "--output-dir", str(tmp_path / "straight"), "--max-steps", "5"]) == 0
    cut = str(tmp_path / "cut")
    assert main([*args, "--output-dir", cut, "--max-steps", "2"]) == 0
    assert main([*args, "--output-dir", cut, "--max-steps", "5", "--resume"]) == 0
    weights = "lora/adapter/adapter_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(Path(cut) / weights)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6)
    rows = [json.loads(x) for x in (Path(cut) / "lora/metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5]
    # Each row logs the lr its step used: warmup over 2 steps starts at 0, as HF's schedule does.
    assert [r["lr"] for r in train_rows[:2]] == [0.0, pytest.approx(5e-3)]
    assert {r["epoch"] for r in train_rows} == {1}  # steps 3-5 are still epoch 1
    summary = json.loads((Path(cut) / "lora/summary.json").read_text())["training"]
    assert len(summary["epoch_times_s"]) == 1 and summary["optimizer_steps"] == 5


def test_a_resume_keeps_the_arms_settings_and_a_failed_one_loses_nothing(
    tiny_model_dir, alpaca_file, tmp_path
):
    """--resume with another lr is refused (only --max-steps, evaluation and logging may
    change); a --resume that fails on bad input leaves a finished arm's summary as it was."""
    args = ["train", "--method", "lora", "--model", str(tiny_model_dir), "--dataset",
            str(alpaca_file), "--no-report", "batch_size=8", "gen_examples=0",
            "epochs=1"]  # fmt: skip
    cut = tmp_path / "cut"
    assert main([*args, "--output-dir", str(cut), "--max-steps", "2"]) == 0
    config = (cut / "lora" / "config.yaml").read_text()
    assert main([*args, "--output-dir", str(cut), "--resume", "lr=1e-3"]) == 2
    assert (cut / "lora" / "config.yaml").read_text() == config
    assert main([*args, "--output-dir", str(cut), "--resume", "eval_every=1"]) == 0
    rows = [json.loads(x) for x in (cut / "lora" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if r["event"] == "eval"]
    assert len(evals) > 2 and len(evals) == len(set(evals))  # an epoch's end: evaluated once
    done = tmp_path / "done"  # no checkpoint to check against: the data check fails instead
    assert (
        main([*args, "--output-dir", str(done), "--max-steps", "1", "save_checkpoints=false"]) == 0
    )
    summary = (done / "lora" / "summary.json").read_text()
    assert main([*args, "--output-dir", str(done), "--resume", "max_seq_len=4"]) == 2
    assert (done / "lora" / "summary.json").read_text() == summary


def test_without_a_validation_split_the_summary_is_strict_json(tmp_path):
    """val_fraction=0: no val metrics (null, shown as -) rather than NaN, which is not JSON."""
    out = tmp_path / "run"
    args = ["train", "--method", "lora", "--limit", "60", "--max-steps", "1", "--output-dir",
            str(out), "val_fraction=0", "gen_examples=0", "eval_every=1"]  # fmt: skip
    assert main(args) == 0

    def refuse(name: str):
        raise ValueError(f"{name} in summary.json")

    summary = json.loads((out / "lora" / "summary.json").read_text(), parse_constant=refuse)
    assert summary["metrics"]["val"]["examples"] == 0 and summary["metrics"]["val"]["loss"] is None
    assert summary["metrics"]["test"]["loss"] > 0
    rows = [json.loads(x) for x in (out / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["event"] == "eval"]
