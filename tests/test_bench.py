"""`tuneoff bench`: every arm and baseline reports every field on identical work; the seed
baseline really is the reference recipe (padded to max_seq_len, fp32 weights, full logits)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_qwen2_config

from tuneoff.bench import synthetic_examples
from tuneoff.bench_worker import ModelShape, model_flops
from tuneoff.data import IGNORE, Example

FIELDS = (
    "supervised_tokens_per_s",
    "tokens_per_s",
    "padding_fraction",
    "optimizer_step_ms",
    "mfu",
    "flops_per_token",
    "memory",
    "params",
    "batch_shapes",
    "frozen_dtypes",
    "time_s",
)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("arch") / "config.json"
    config = tiny_qwen2_config(eos_token_id=2, pad_token_id=0)
    path.write_text(config.to_json_string())
    return path


@pytest.fixture(scope="module")
def bench_report(tiny_config, tmp_path_factory):
    from tuneoff.cli import main

    pytest.importorskip("trl")
    work = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--model", str(tiny_config), "--steps", "2", "--warmup-steps", "1"]
    argv += ["--seq-len", "256", "--work-dir", str(work), "--device", "cpu", "--json"]
    argv += ["batch_size=8", "grad_accum=1", "lr=1e-3"]  # tuneoff's arms; seed: 4 x 2
    assert main(argv) == 0
    return json.loads((work / "bench.json").read_text())


def test_every_arm_reports_every_field(bench_report):
    arms = {r["arm"]: r for r in bench_report["arms"]}
    assert list(arms) == ["lora", "full", "seed", "trl"]
    for name, arm in arms.items():
        assert arm["status"] == "ok", (name, arm.get("reason"))
        for key in FIELDS:
            assert key in arm, (name, key)
        assert arm["supervised_tokens_per_s"] > 0 and arm["tokens_per_s"] > 0
        assert 0 <= arm["padding_fraction"] < 1
        assert arm["optimizer_step_ms"] > 0
        assert arm["mfu"] is None  # no peak FLOP/s on CPU
        assert arm["memory"]["peak_rss_gib"] > 0
        if name != "trl":  # the tensors' own peak over one window, where RSS holds the heap too
            assert 0 < arm["memory"]["peak_step_tensors_gib"] < arm["memory"]["peak_rss_gib"]
        assert arm["supervised_tokens"] == arms["seed"]["supervised_tokens"]  # same examples
        assert arm["tokens"] == arms["seed"]["tokens"]
    for name in ("lora", "full"):
        assert set(bench_report["ratios"][name]) == {"seed", "trl"}
    assert arms["lora"]["batching"] == "packed"
    assert arms["lora"]["attention"] == "tuneoff_varlen"  # packed examples attended one by one
    assert arms["lora"]["attention_calls"]["sdpa_per_example"] > 0  # CPU: no flash kernel
    assert arms["seed"]["attention"] == "sdpa" and not arms["seed"]["attention_calls"]
    assert arms["lora"]["padding_fraction"] < arms["seed"]["padding_fraction"]
    # the same window: full fine-tuning keeps every linear's input and every weight's gradient
    tensors = {k: arms[k]["memory"]["peak_step_tensors_gib"] for k in ("lora", "full")}
    assert tensors["full"] > tensors["lora"]
    # same initial weights and the same first batch: the same loss before any update
    assert arms["lora"]["losses"][0] == pytest.approx(arms["seed"]["losses"][0], rel=1e-5)
    assert arms["full"]["losses"][0] == pytest.approx(arms["seed"]["losses"][0], rel=1e-5)


def test_seed_baseline_is_the_reference_recipe(bench_report):
    seed = next(r for r in bench_report["arms"] if r["arm"] == "seed")
    assert all(width == 256 for _, width in seed["batch_shapes"])  # padded to max_seq_len
    assert all(rows == 4 for rows, _ in seed["batch_shapes"])  # micro-batch 4 ...
    assert seed["grad_accum"] == 2  # ... with the accumulation that keeps 8 examples per step
    assert "attention_mask" in seed["batch_keys"]
    assert set(seed["frozen_dtypes"]) == {"torch.float32"}  # fp32 weights
    assert set(seed["trainable_dtypes"]) == {"torch.float32"}
    assert seed["loss_chunk_size"] == 0  # full-vocabulary logits
    assert seed["precision"] == "fp32"  # CPU; fp16 autocast + GradScaler on CUDA
    assert seed["padding_fraction"] > 0.3


def test_synthetic_lengths_follow_alpaca_estimates():
    examples = synthetic_examples(4000, 100_000, vocab=1000, eos=2, seed=0)
    lengths = sorted(len(e.input_ids) for e in examples)
    assert 180 < sum(lengths) / len(lengths) < 200  # mean about 190
    assert 145 < lengths[len(lengths) // 2] < 165  # median about 155
    assert all(e.input_ids[-1] == 2 and e.labels[-1] == 2 for e in examples)  # EOS supervised
    cut = synthetic_examples(200, 256, vocab=1000, eos=2, seed=0)
    assert max(len(e.input_ids) for e in cut) == 256
    assert all(e.labels[0] == IGNORE for e in cut)


def test_model_flops_by_hand():
    shape = ModelShape(body_params=100, head_params=10, attn_dim=4, layers=2)
    example = Example([1, 2, 3], [IGNORE, 2, 3], False)  # 3 tokens, 2 supervised
    attention = 6 * 4 * 2 * 9
    assert model_flops([example], shape, full=True, lora_params=0) == 6 * 100 * 3 + 6 * 10 * 2 + (
        attention
    )
    lora = model_flops([example], shape, full=False, lora_params=5)
    assert lora == 4 * 100 * 3 + 6 * 5 * 3 + 4 * 10 * 2 + attention


def test_median_run_keeps_every_runs_speed():
    from tuneoff.bench import median_run

    runs = [
        {"status": "ok", "supervised_tokens_per_s": v, "run": i} for i, v in enumerate([5, 9, 7])
    ]
    assert median_run(runs) == {**runs[2], "runs_supervised_tokens_per_s": [5, 9, 7]}
    assert median_run(runs[:2])["run"] == 0  # even count: the lower middle
    failed = {"status": "failed", "reason": "x"}
    assert median_run([runs[0], failed]) == failed
    assert median_run(runs[:1]) == runs[0]


def test_seed_config_is_the_reference_recipe():
    from tuneoff.bench import seed_config
    from tuneoff.config import Config

    seed = seed_config(Config(batch_size=16, grad_accum=1, micro_batch_tokens=1024), "cpu", None)
    assert (seed.batch_size, seed.grad_accum, seed.micro_batch_tokens) == (4, 4, 0)
    assert (seed.batching, seed.loss_chunk_size, seed.weights_dtype) == ("padded", 0, "fp32")
    assert not seed.fast_dropout and not seed.fused_optimizer and not seed.lean_activations


def test_arms_take_the_same_examples_per_step_under_a_token_budget():
    from tuneoff.batching import micro_batch_cost
    from tuneoff.bench_worker import windows_of
    from tuneoff.config import Config

    lengths = [len(e.input_ids) for e in synthetic_examples(48, 256, 100, 2, 0)]
    plain = Config(batch_size=8, grad_accum=2)
    by_count = windows_of(3, plain, lengths)
    by_tokens = windows_of(3, plain.replace(micro_batch_tokens=600), lengths)
    for a, b in zip(by_count, by_tokens, strict=True):
        assert [i for idx, _ in a for i in idx] == [i for idx, _ in b for i in idx]
        assert all(
            micro_batch_cost([lengths[i] for i in idx], "packed", 256) <= 600 for idx, _ in b
        )
    assert [len(w) for w in by_count] == [2, 2, 2] and max(len(w) for w in by_tokens) > 2


def test_repeats_interleave_arm_processes(tiny_config, tmp_path, capfd):
    """Also: one step without warm-up (--warmup-steps 0) is timed in TRL as in tuneoff's arms
    (it divided by zero, its clock starting at the end of the first step)."""
    from tuneoff.cli import main

    pytest.importorskip("trl")
    work = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_config), "--steps", "1", "--warmup-steps", "0"]
    argv += ["--methods", "lora", "--baselines", "trl", "--repeats", "2", "--seq-len", "64"]
    argv += ["--work-dir", str(work), "--device", "cpu", "batch_size=4", "grad_accum=1"]
    assert main(argv) == 0
    report = json.loads((work / "bench.json").read_text())
    assert report["repeats"] == 2
    for arm in report["arms"]:
        assert arm["status"] == "ok", arm.get("reason")
        assert len(arm["runs_supervised_tokens_per_s"]) == 2
        assert arm["supervised_tokens_per_s"] in arm["runs_supervised_tokens_per_s"]
        assert arm["time_s"] > 0 and len(arm["batch_shapes"]) == 1
    lora, trl = report["arms"]
    assert lora["supervised_tokens"] == trl["supervised_tokens"]  # the same step measured
    started = [line for line in capfd.readouterr().err.splitlines() if line.startswith("== ")]
    assert started == ["== lora.1", "== trl.1", "== lora.2", "== trl.2"]  # interleaved
    assert sorted(p.name for p in work.glob("*.json") if ".spec" not in p.name) == [
        "bench.json",
        "examples.json",
        "lora.1.json",
        "lora.2.json",
        "trl.1.json",
        "trl.2.json",
    ]


def test_ratios_are_paired_per_round_then_medianed():
    from tuneoff.bench import median_ratios, ratios

    def arm(name, kind, speed):
        return {"arm": name, "kind": kind, "status": "ok", "supervised_tokens_per_s": speed}

    rounds = [
        ratios([arm("lora", "tuneoff", 20), arm("seed", "seed", 10)]),  # 2.0
        ratios([arm("lora", "tuneoff", 12), arm("seed", "seed", 4)]),  # 3.0: a slow seed run
        ratios([arm("lora", "tuneoff", 30), arm("seed", "seed", 12)]),  # 2.5
    ]
    assert median_ratios(rounds) == {"lora": {"seed": 2.5}}  # ratio of the medians: 20/10 = 2
    rounds[0] = ratios([arm("lora", "tuneoff", 20), {**arm("seed", "seed", 10), "status": "oom"}])
    assert median_ratios(rounds) == {"lora": {"seed": 2.5}}  # rounds where both ran (3.0, 2.5)


def test_ablation_arms_run_on_the_same_batches(tiny_config, tmp_path, capfd):
    """`--methods lora,lora:lean_activations=false`: both arms on identical batches, the
    variant with its own key (here: more tensor memory for the same window)."""
    from tuneoff.cli import main

    work = tmp_path / "bench"
    argv = ["bench", "--model", str(tiny_config), "--steps", "1", "--warmup-steps", "0"]
    argv += ["--methods", "lora,lora:lean_activations=false", "--baselines", "none"]
    argv += ["--seq-len", "64", "--work-dir", str(work), "--device", "cpu", "--json"]
    assert main([*argv, "batch_size=4", "grad_accum=1"]) == 0
    arms = {r["arm"]: r for r in json.loads((work / "bench.json").read_text())["arms"]}
    lean, stock = arms["lora"], arms["lora:lean_activations=false"]
    assert lean["status"] == stock["status"] == "ok"
    assert lean["supervised_tokens"] == stock["supervised_tokens"]
    assert lean["losses"] == pytest.approx(stock["losses"], rel=1e-5)
    assert stock["memory"]["peak_step_tensors_gib"] > lean["memory"]["peak_step_tensors_gib"]
    capfd.readouterr()
    for bad in ("lora:nope=1", "lora:method=full", "base", "lora,lora", ","):
        assert main([*argv[:8], bad, *argv[9:]]) == 2, bad
        assert f"--methods {bad}" in capfd.readouterr().err, bad


def test_without_work_dir_only_bench_json_is_kept_and_a_failure_leaves_nothing(
    tmp_path, monkeypatch, capsys
):
    import tempfile

    from tuneoff import bench
    from tuneoff.cli import main

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["bench", "--preset", "tiny", "--steps", "1", "--warmup-steps", "0", "--json",
            "--device", "cpu"]  # fmt: skip

    def fake_run(plan, *args):
        (plan.work_dir / "lora.json").write_text("{}")  # what arms leave
        return {"arms": {}, "ratios": {}, "repeats": 1}

    monkeypatch.setattr(bench, "run_bench", fake_run)
    assert main(argv) == 0
    (kept,) = tmp_path.glob("tuneoff-bench-*")
    assert [p.name for p in kept.iterdir()] == ["bench.json"]

    def failing_run(plan, *args):
        (plan.work_dir / "lora.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "run_bench", failing_run)
    assert main(argv) == 130
    assert list(tmp_path.glob("tuneoff-bench-*")) == [kept]
