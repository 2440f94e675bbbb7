"""Several processes under torchrun (2 CPU processes, gloo): DDP, FSDP2 and DeepSpeed ZeRO-1/2 give
one run directory, one report, and the updates of one process accumulating the same micro-batches
(also when each process cuts its examples by tokens); FSDP2 gathers shards to save and resumes
whatever the world size that wrote the checkpoint; DeepSpeed saves ZeRO's fp32 masters and resumes
from its engine's checkpoint; each process resumes with its own random state."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")

ARGS = ["--method", "full", "--limit", "300", "--max-steps", "6", "gen_examples=0",
        "save_checkpoints=false", "eval_batch_size=32"]  # fmt: skip
# What `accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy
# TRANSFORMER_BASED_WRAP` puts in each process's environment.
FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
         "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}  # fmt: skip
FSDP_ON_CPU = str(Path(__file__).with_name("fsdp_on_cpu.py"))
DEEPSPEED_ON_CPU = str(Path(__file__).with_name("deepspeed_on_cpu.py"))
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed"
)


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def torchrun(
    *args: str, fsdp: bool = False, zero: int = 0, **env: str
) -> subprocess.CompletedProcess:
    launch = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2"]
    if fsdp:
        return run([*launch, FSDP_ON_CPU, *args], **FSDP2, **env)
    if zero:  # what `accelerate launch --use_deepspeed --zero_stage N` sets
        stage = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(zero)}
        return run([*launch, DEEPSPEED_ON_CPU, *args], **stage, **env)
    return run([*launch, "-m", "tuneoff", *args], **env)


def one_process(*args: str, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "tuneoff", *args], **env)


def summary(run_dir: Path, arm: str = "full") -> dict:
    return json.loads((run_dir / arm / "summary.json").read_text())


def same_log(run_dir: Path, reference: Path, arm: str = "full") -> None:
    """The per-step loss and tokens logged match, and no step is logged twice (one writer)."""
    logs = []
    for path in (run_dir, reference):
        lines = (path / arm / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines if '"train"' in line]
        assert len({r["step"] for r in rows}) == len(rows)
        logs.append(rows)
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]
    assert [r["loss"] for r in logs[0]] == pytest.approx([r["loss"] for r in logs[1]], rel=1e-5)


def same_counts(run_dir: Path, reference: Path, arm: str = "full") -> None:
    """The tokens trained on, supervised, and padding, as counted over every process."""
    a, b = summary(run_dir, arm)["training"], summary(reference, arm)["training"]
    for key in ("train_tokens", "train_supervised_tokens", "padding_fraction"):
        assert a[key] == b[key], key


@pytest.fixture(scope="module")
def accumulating(tmp_path_factory) -> Path:
    """One process accumulating 2 micro-batches per step: what 2 processes x 1 must equal."""
    out = tmp_path_factory.mktemp("one") / "run"
    done = one_process("train", "--output-dir", str(out), *ARGS, "grad_accum=2")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def accumulating_32(tmp_path_factory) -> Path:
    """One process accumulating 2 micro-batches of 32 examples per step."""
    out = tmp_path_factory.mktemp("one32") / "run"
    done = one_process("train", "--output-dir", str(out), *ARGS, "grad_accum=2", "batch_size=32")
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_two_processes_equal_one_process_accumulating_their_micro_batches(
    tmp_path, accumulating, accumulating_32
):
    ddp = torchrun("train", "--output-dir", str(tmp_path / "ddp"), *ARGS, "grad_accum=1")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("report:") == 1  # only rank 0 writes the report
    s_ddp, s_one = summary(tmp_path / "ddp"), summary(accumulating)
    assert s_ddp["runtime"]["world_size"] == 2 and s_one["runtime"]["world_size"] == 1
    assert s_ddp["runtime"]["distributed"] == "ddp" and s_one["runtime"]["distributed"] == "none"
    assert s_ddp["memory_plan"]["predicted"]["settings"]["processes"] == 2  # with DDP's buckets
    assert "processes" not in s_one["memory_plan"]["predicted"]["settings"]
    # Rank r takes micro-batch r of each window: the same examples per optimizer step, and the
    # loss is normalized by the supervised tokens of the whole window across processes.
    assert s_ddp["training"]["optimizer_steps"] == s_one["training"]["optimizer_steps"] == 6
    ddp_train, one_train = s_ddp["training"], s_one["training"]
    assert ddp_train["train_supervised_tokens"] == one_train["train_supervised_tokens"]
    assert ddp_train["examples_per_step"] == one_train["examples_per_step"]  # 2 x 1 = 1 x 2
    assert s_ddp["metrics"]["val"]["loss"] == pytest.approx(s_one["metrics"]["val"]["loss"],
                                                            rel=1e-5)  # fmt: skip
    # Each process evaluated its share of the batches; the sums over both are the whole split's.
    for split in ("train", "val", "test"):
        for key in ("tokens", "supervised_tokens", "examples"):
            assert s_ddp["metrics"][split][key] == s_one["metrics"][split][key]
    # The logged loss and tokens are the window's over both processes, written once.
    same_log(tmp_path / "ddp", accumulating)
    cut = torchrun("train", "--output-dir", str(tmp_path / "cut"), *ARGS, "grad_accum=1",
                   "batch_size=32", "micro_batch_tokens=256")  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert summary(tmp_path / "cut")["metrics"]["val"]["loss"] == pytest.approx(
        summary(accumulating_32)["metrics"]["val"]["loss"], rel=1e-5
    )


def test_fsdp2_full_fine_tuning_equals_one_process_and_saves_whole_weights(
    tmp_path, accumulating, accumulating_32
):
    fsdp = torchrun("train", "--output-dir", str(tmp_path / "fsdp"), *ARGS, "grad_accum=1",
                    fsdp=True)  # fmt: skip
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    assert fsdp.stdout.count("report:") == 1
    s_fsdp, s_one = summary(tmp_path / "fsdp"), summary(accumulating)
    assert s_fsdp["runtime"]["world_size"] == 2 and s_fsdp["runtime"]["distributed"] == "fsdp2"
    settings = s_fsdp["memory_plan"]["predicted"]["settings"]  # per process of the 2
    assert settings["processes"] == 2 and settings["sharding"] == "fsdp2"
    assert s_fsdp["metrics"]["val"]["loss"] == pytest.approx(s_one["metrics"]["val"]["loss"],
                                                             rel=1e-5)  # fmt: skip
    same_log(tmp_path / "fsdp", accumulating)
    # Gathered from both shards, tied head saved once, as one process saves it.
    sharded = load_file(tmp_path / "fsdp" / "full" / "model" / "model.safetensors")
    whole = load_file(accumulating / "full" / "model" / "model.safetensors")
    assert sharded.keys() == whole.keys()
    for name, weight in whole.items():
        torch.testing.assert_close(sharded[name], weight, rtol=0, atol=1e-5)
    # Cut by tokens, processes hold unequal micro-batch counts; under FSDP each forward is a
    # collective, so the fewer are topped up with unsupervised copies: same updates.
    cut = torchrun("train", "--output-dir", str(tmp_path / "cut"), *ARGS, "grad_accum=1",
                   "batch_size=32", "micro_batch_tokens=256", fsdp=True)  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert summary(tmp_path / "cut")["metrics"]["val"]["loss"] == pytest.approx(
        summary(accumulating_32)["metrics"]["val"]["loss"], rel=1e-5
    )
    same_counts(tmp_path / "cut", accumulating_32)  # the unsupervised copies are not data


def test_fsdp2_lora_resumes_from_its_gathered_checkpoint_as_one_uninterrupted_process(tmp_path):
    args = ["--method", "lora", "--limit", "160", "epochs=2", "gen_examples=2",
            "eval_batch_size=32", "lora_dropout=0", "lr=1e-2"]  # fmt: skip
    straight = one_process("train", "--output-dir", str(tmp_path / "one"), *args, "grad_accum=2")
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = str(tmp_path / "fsdp")
    cut = torchrun("train", "--output-dir", out, *args, "grad_accum=1", fsdp=True,
                   TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH="1")  # fmt: skip
    assert cut.returncode != 0 and "--resume" in cut.stderr
    assert not (tmp_path / "fsdp" / "lora" / "summary.json").exists()
    saved = load_file(tmp_path / "fsdp" / "lora" / "checkpoint" / "trainable.safetensors")
    assert saved and all("lora_" in name for name in saved)  # whole adapter tensors, no base
    resumed = torchrun("train", "--output-dir", out, *args, "grad_accum=1", "--resume", fsdp=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert summary(tmp_path / "fsdp", "lora")["training"]["epochs_completed"] == 2
    adapter = "lora/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "fsdp" / adapter), load_file(tmp_path / "one" / adapter)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


@needs_deepspeed
def test_deepspeed_zero_1_2_and_3_equal_one_process_and_save_whole_weights(
    tmp_path, accumulating, accumulating_32
):
    zero2 = torchrun("train", "--output-dir", str(tmp_path / "z2"), *ARGS, "grad_accum=1", zero=2)
    assert zero2.returncode == 0, zero2.stderr[-2000:]
    assert zero2.stdout.count("report:") == 1
    s_z2, s_one = summary(tmp_path / "z2"), summary(accumulating)
    assert s_z2["runtime"]["world_size"] == 2
    assert s_z2["memory_plan"]["predicted"]["settings"]["sharding"] == "zero2"
    assert s_z2["runtime"]["distributed"] == "deepspeed-zero2"
    assert s_z2["metrics"]["val"]["loss"] == pytest.approx(s_one["metrics"]["val"]["loss"],
                                                           rel=1e-5)  # fmt: skip
    same_log(tmp_path / "z2", accumulating)
    grad_norms = []  # the engine clips: its norm is logged, as the loop's is
    for path in (tmp_path / "z2", accumulating):
        lines = (path / "full" / "metrics.jsonl").read_text().splitlines()
        grad_norms.append([json.loads(x)["grad_norm"] for x in lines if '"train"' in x])
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)
    saved = load_file(tmp_path / "z2" / "full" / "model" / "model.safetensors")
    whole = load_file(accumulating / "full" / "model" / "model.safetensors")
    assert saved.keys() == whole.keys()
    for name, weight in whole.items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=1e-5)
    # ZeRO-3 partitions the weights too (the model loads partitioned): gathered to save.
    zero3 = torchrun("train", "--output-dir", str(tmp_path / "z3"), *ARGS, "grad_accum=1", zero=3)
    assert zero3.returncode == 0, zero3.stderr[-2000:]
    s_z3 = summary(tmp_path / "z3")
    assert s_z3["runtime"]["distributed"] == "deepspeed-zero3"
    assert s_z3["params"] == s_one["params"]  # counted whole, not the partitions
    assert s_z3["config"]["loss_chunk_size"] == 0  # the chunked loss reads the head directly
    assert s_z3["metrics"]["val"]["loss"] == pytest.approx(s_one["metrics"]["val"]["loss"],
                                                           rel=1e-5)  # fmt: skip
    saved = load_file(tmp_path / "z3" / "full" / "model" / "model.safetensors")
    assert saved.keys() == whole.keys()
    for name, weight in whole.items():
        torch.testing.assert_close(saved[name], weight, rtol=0, atol=1e-5)
    # ZeRO-2 reduces gradients in every backward: unequal micro-batch counts are topped up.
    cut = torchrun("train", "--output-dir", str(tmp_path / "cut"), *ARGS, "grad_accum=1",
                   "batch_size=32", "micro_batch_tokens=256", zero=1)  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert summary(tmp_path / "cut")["metrics"]["val"]["loss"] == pytest.approx(
        summary(accumulating_32)["metrics"]["val"]["loss"], rel=1e-5
    )
    same_counts(tmp_path / "cut", accumulating_32)


@needs_deepspeed
@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_bf16_lora_resumes_as_it_would_have_run(tmp_path, zero):
    """Under bf16 DeepSpeed computes with bf16 copies of every weight: the adapter saved is
    ZeRO's fp32 masters, and a resumed run equals an uninterrupted one (its random states too).
    Under ZeRO-3 the adapter trains through PEFT's forward (the fused one would read a
    partitioned base weight)."""
    args = ["--method", "lora", "--limit", "160", "epochs=2", "gen_examples=0",
            "eval_batch_size=32", "lora_dropout=0.3", "lr=1e-2", "precision=bf16"]  # fmt: skip
    straight = torchrun("train", "--output-dir", str(tmp_path / "straight"), *args, zero=zero)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = str(tmp_path / "cut")
    cut = torchrun("train", "--output-dir", out, *args, zero=zero,
                   TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH="1")  # fmt: skip
    assert cut.returncode != 0 and "--resume" in cut.stderr
    assert (tmp_path / "cut" / "lora" / "checkpoint" / "deepspeed").is_dir()
    alone = one_process("train", "--output-dir", out, *args, "--resume")
    error = alone.stderr.strip().splitlines()[-1]
    assert alone.returncode == 2 and error.startswith("tuneoff: error:")
    # (ZeRO-3's arm ran without the chunked loss: that setting differs first)
    assert ("under DeepSpeed on 2" if zero == 2 else "loss_chunk_size=0 now 512") in error
    resumed = torchrun("train", "--output-dir", out, *args, "--resume", zero=zero)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    adapter = "lora/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "cut" / adapter), load_file(tmp_path / "straight" / adapter)
    assert a.keys() == b.keys() and {w.dtype for w in a.values()} == {torch.float32}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # Not a bf16 copy cast back: the masters hold bits that bf16 cannot.
    assert any((w != w.bfloat16().float()).any() for w in a.values())


def test_compare_runs_every_arm_under_its_launcher(tmp_path):
    """--launcher: base (evaluation only: no wrapper) and each method in 2 processes."""
    launcher = f"{shutil.which('torchrun')} --standalone --nproc_per_node 2"
    args = ["--limit", "160", "epochs=1", "gen_examples=3", "eval_batch_size=32"]
    out = tmp_path / "run"
    done = one_process("compare", "--output-dir", str(out), "--launcher", launcher,
                       "--methods", "lora", *args)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # The report's command reruns it under the same launcher.
    assert f"--launcher '{launcher}'" in (out / "report.md").read_text()
    assert f"--launcher '{launcher}'" in (out / "config.yaml").read_text().splitlines()[0]
    test = [json.loads(x) for x in (out / "splits" / "test.jsonl").read_text().splitlines()]
    for arm in ("base", "lora"):
        assert summary(out, arm)["status"] == "ok"
        assert summary(out, arm)["runtime"]["world_size"] == 2
        # Each process answered its share; the answers come back in the prompts' order.
        lines = (out / arm / "generations.jsonl").read_text().splitlines()
        assert [json.loads(x)["record"] for x in lines] == test[:3]
        assert summary(out, arm)["generation"]["examples"] == 3
    # Under FSDP2 and DeepSpeed too, the base arm is evaluated unwrapped.
    launches = [{"fsdp": True}]
    if importlib.util.find_spec("deepspeed") is not None:
        launches.append({"zero": 3})  # the model loads partitioned: DeepSpeed's engine gathers
    for launch in launches:
        base = tmp_path / str(launch)
        done = torchrun("train", "--method", "base", "--output-dir", str(base), *args, **launch)
        assert done.returncode == 0, done.stderr[-2000:]
        loss = summary(base, "base")["metrics"]["val"]["loss"]
        assert loss == pytest.approx(summary(out, "base")["metrics"]["val"]["loss"], rel=1e-6)
    # A launcher that runs something else: every arm a failed row, not a missing report.
    odd = tmp_path / "odd"
    done = one_process("compare", "--output-dir", str(odd), "--launcher", "true", *args)
    assert done.returncode == 1 and (odd / "report.md").is_file()
    assert "without writing its summary" in summary(odd, "lora")["error"]
    # compare itself under a launcher would start every arm once per process: refused.
    for extra, env in ((["--launcher", "no-such-launcher"], {}), ([], {"WORLD_SIZE": "2"})):
        done = one_process("compare", "--output-dir", str(tmp_path / "x"), *args, *extra, **env)
        assert done.returncode == 2 and "--launcher" in done.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x").exists()


def test_ddp_resume_restores_each_processs_random_state(tmp_path):
    """Cut by tokens, the processes run unequal numbers of forward passes, so their random
    states (dropout) differ at a checkpoint: each must get its own back."""
    args = ["--method", "lora", "--limit", "160", "epochs=2", "gen_examples=0",
            "eval_batch_size=32", "lora_dropout=0.3", "lr=1e-2", "grad_accum=1",
            "batch_size=32", "micro_batch_tokens=256"]  # fmt: skip
    straight = torchrun("train", "--output-dir", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = str(tmp_path / "cut")
    cut = torchrun("train", "--output-dir", out, *args, TUNEOFF_TEST_INTERRUPT_AFTER_EPOCH="1")
    assert cut.returncode != 0 and "--resume" in cut.stderr
    # One process would take half the examples per step: refused, nothing written.
    alone = one_process("train", "--output-dir", out, *args, "--resume")
    error = alone.stderr.strip().splitlines()[-1]
    assert alone.returncode == 2 and "examples per optimizer step" in error
    resumed = torchrun("train", "--output-dir", out, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    adapter = "lora/adapter/adapter_model.safetensors"
    a, b = load_file(tmp_path / "cut" / adapter), load_file(tmp_path / "straight" / adapter)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    # Counted over both processes before the checkpoint, and after it, once each.
    same_counts(tmp_path / "cut", tmp_path / "straight", "lora")
    # A --resume of the finished arm that fails on bad input leaves its summary as it was.
    done = summary(tmp_path / "cut", "lora")
    bad = one_process("train", "--output-dir", out, *args, "--resume", "max_seq_len=4")
    assert bad.returncode == 2 and summary(tmp_path / "cut", "lora") == done


def test_out_of_memory_in_one_process_ends_the_launch_with_an_oom_row(tmp_path):
    """The other process waits in a collective the one out of memory never joins: that one
    writes the row and ends the launch, instead of both hanging."""
    out = tmp_path / "run"
    args = ["--method", "lora", "--limit", "160", "epochs=1", "gen_examples=0"]
    done = torchrun("train", "--output-dir", str(out), *args, TUNEOFF_TEST_OOM="lora@1")
    assert done.returncode != 0
    row = summary(out, "lora")
    assert row["status"] == "oom" and row["error"].endswith("(process 1)")


def test_launches_not_supported_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "x"
    config = tmp_path / "ds.json"
    config.write_text('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}')
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    deepspeed = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    refused = [
        ({"ACCELERATE_USE_FSDP": "true"}, [], "--fsdp_version 2"),
        (FSDP2, ["optimizer=adamw8bit"], "optimizer=adamw_lean"),
    ]
    if importlib.util.find_spec("deepspeed") is not None:
        refused += [
            ({**deepspeed, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, [], "--zero_stage 1, 2 or 3"),
            ({**deepspeed, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, ["--method", "qlora"],
             "--zero_stage 2"),
            ({**deepspeed, "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, [],
             "without offload"),
            (deepspeed, ["optimizer=adamw_lean"], "use optimizer=adamw"),
            ({**deepspeed, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config)}, [], "remove it"),
            ({**deepspeed, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(listed)}, [], "JSON object"),
        ]  # fmt: skip
    for env, extra, fix in refused:
        done = one_process("train", "--output-dir", str(out), *ARGS, *extra, **env)
        assert done.returncode == 2
        assert done.stderr.startswith("tuneoff: error:") and fix in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
        assert not out.exists()
    # Under a launcher every process meets the error: it is said once.
    done = torchrun("train", "--output-dir", str(out), *ARGS, "optimizer=adamw8bit", **FSDP2)
    assert done.returncode != 0 and done.stderr.count("tuneoff: error:") == 1
    assert not out.exists()
