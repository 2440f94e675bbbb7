"""End to end: `tuneoff compare` on a reduced embedded default (every output file and summary
field), an injected OOM that becomes a row, `inspect`, and the report's confound list."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneoff.cli import main
from tuneoff.embedded import TINY_MODEL_DIR
from tuneoff.report import confounds

REDUCED = ["--limit", "400", "--max-steps", "8", "epochs=1", "eval_every=4", "gen_examples=16",
           "batch_size=8"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "run"
    assert main(["compare", "--output-dir", str(out), *REDUCED]) == 0
    return out


def summary(run_dir, arm: str) -> dict:
    return json.loads((run_dir / arm / "summary.json").read_text())


def test_run_directory_holds_every_output(run_dir):
    for name in ("config.yaml", "report.md", "loss_curves.png", "splits/manifest.json",
                 "splits/train.jsonl", "splits/val.jsonl", "splits/test.jsonl"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    for arm in ("base", "lora", "full"):
        for name in ("summary.json", "config.yaml", "generations.jsonl"):
            assert (run_dir / arm / name).is_file(), f"{arm}/{name}"
    assert (run_dir / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "full" / "model" / "model.safetensors").is_file()
    assert not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pt"))  # no pickle


def test_summaries_carry_every_metric(run_dir):
    for arm in ("base", "lora", "full"):
        s = summary(run_dir, arm)
        assert s["status"] == "ok"
        for split in ("train", "val", "test"):
            m = s["metrics"][split]
            assert m["perplexity"] == pytest.approx(math.exp(m["loss"]))
            assert m["bits_per_token"] == pytest.approx(m["loss"] / math.log(2))
            assert 0 <= m["token_accuracy"] <= 1 and m["tokens_per_s"] > 0
        assert s["memory"]["peak_rss_gib"] > 0
        assert {"torch", "transformers", "peft", "accelerate"} <= set(s["versions"])
        assert "git_sha" in s and s["runtime"]["precision"] == "fp32"
        assert set(s["data"]["splits"]) == {"train", "val", "test"}
        assert 0 <= s["generation"]["exact_match"] <= 1
    for arm in ("lora", "full"):
        t = summary(run_dir, arm)["training"]
        assert t["optimizer_steps"] == 8
        assert t["train_supervised_tokens_per_s"] > 0 and t["train_tokens_per_s"] > 0
        assert t["time_per_epoch_s"] > 0 and 0 <= t["padding_fraction"] < 1
    lora, full = summary(run_dir, "lora")["params"], summary(run_dir, "full")["params"]
    assert 0 < lora["trainable"] < lora["total"] and full["trainable"] == full["total"]


def test_both_arms_learn_and_share_the_split(run_dir):
    base_val = summary(run_dir, "base")["metrics"]["val"]["loss"]
    hashes = {
        json.dumps(summary(run_dir, a)["data"]["split_sha256"]) for a in ("base", "lora", "full")
    }
    assert len(hashes) == 1
    for arm in ("lora", "full"):
        assert summary(run_dir, arm)["metrics"]["val"]["loss"] < base_val, arm


def test_metrics_log_has_steps_and_validations(run_dir):
    rows = [json.loads(x) for x in (run_dir / "lora" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    for key in ("epoch", "loss", "lr", "grad_norm", "tokens_per_s", "memory_gib"):
        assert key in train[0]
    assert [r["step"] for r in rows if r["event"] == "eval"] == [4, 8]


def test_report_has_the_reference_tables_and_no_confound(run_dir):
    text = (run_dir / "report.md").read_text()
    for heading in ("## Training time & resources", "## Results: Validation", "## Results: Test",
                    "## Generation", "## Confounds", "No confounds"):  # fmt: skip
        assert heading in text, heading


def test_outputs_load_in_plain_transformers_and_peft(run_dir):
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    adapted = PeftModel.from_pretrained(base, run_dir / "lora" / "adapter")
    full = AutoModelForCausalLM.from_pretrained(run_dir / "full" / "model")
    AutoTokenizer.from_pretrained(run_dir / "lora" / "adapter")
    ids = torch.tensor([[1, 2, 3]])
    assert adapted(input_ids=ids).logits.shape == full(input_ids=ids).logits.shape


def test_inspect_marks_supervised_tokens(run_dir, capsys):
    assert main(["inspect", str(run_dir / "lora"), "--split", "val", "--limit", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- val[") == 2 and "[<|im_end|>]" in text
    assert main(["inspect", str(run_dir), "--split", "test", "--limit", "2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"])
        assert row["labels"][0] == -100 and row["labels"][-1] == row["input_ids"][-1]


def test_inspect_counts_what_the_loss_counts_with_train_on_prompt(run_dir, tmp_path, capsys):
    """Every token is a label, but the first is predicted from nothing: not counted, as in
    `batching.supervised_tokens`."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir / "splits", copy / "splits")
    config = (
        (run_dir / "config.yaml")
        .read_text()
        .replace("train_on_prompt: false", "train_on_prompt: true")
    )
    (copy / "config.yaml").write_text(config)
    assert main(["inspect", str(copy), "--split", "val", "--limit", "1"]) == 0
    head, tokens = capsys.readouterr().out.splitlines()[:2]
    total = int(head.split(": ")[1].split(" tokens")[0])
    assert f"{total - 1} supervised" in head and not tokens.startswith("[")


def test_rerun_without_overwrite_is_refused(run_dir, capsys):
    assert main(["compare", "--output-dir", str(run_dir), *REDUCED]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_an_oom_in_one_arm_becomes_a_row(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEOFF_TEST_OOM", "full")
    out = tmp_path / "oom"
    args = ["compare", "--output-dir", str(out), "--limit", "200", "--max-steps", "2",
            "epochs=1", "gen_examples=4"]  # fmt: skip
    assert main(args) == 0
    full, lora = summary(out, "full"), summary(out, "lora")
    assert full["status"] == "oom" and "out of memory" in full["error"]
    assert full["memory"]["peak_rss_gib"] > 0  # the memory reached is reported
    assert lora["status"] == "ok" and lora["training"]["optimizer_steps"] == 2
    assert "**oom**" in (out / "report.md").read_text()
    # The planner's prediction is recorded beside the measurement, and advice with the OOM.
    for arm in (full, lora):
        assert arm["memory_plan"]["predicted"]["peak_allocated_gib"] > 0
    assert "fits" in full["advice"] and "Predicted peak" in (out / "report.md").read_text()


def test_a_failed_arm_is_a_row_and_a_non_zero_exit(tmp_path, capsys):
    """Unlike an OOM (a measured result), an arm that fails makes compare exit 1."""
    out = tmp_path / "failed"
    args = ["compare", "--output-dir", str(out), "--limit", "60", "--max-steps", "1",
            "methods=full", "gen_examples=0", "full.weights_dtype=fp16"]  # fmt: skip
    assert main(args) == 1
    assert summary(out, "full")["status"] == "failed" and summary(out, "base")["status"] == "ok"
    assert "arms failed: full" in capsys.readouterr().err


def test_per_arm_overrides_are_saved_with_the_run_and_read_by_its_arms(tmp_path):
    """The run's config.yaml keeps `full.lr`: each arm's process reads it from there, and
    `compare --config` on it reruns the same comparison (before, it dropped them)."""
    from tuneoff.cli import build_parser
    from tuneoff.runs import resolve_args

    out = tmp_path / "per-arm"
    args = ["compare", "--output-dir", str(out), "--limit", "60", "--max-steps", "1",
            "epochs=1", "gen_examples=0", "full.lr=3e-05", "lora.lora_r=4"]  # fmt: skip
    assert main(args) == 0
    assert summary(out, "full")["config"]["lr"] == 3e-5
    lora = summary(out, "lora")["config"]
    assert lora["lr"] == summary(out, "base")["config"]["lr"] != 3e-5 and lora["lora_r"] == 4
    assert "tuneoff compare --config" in (out / "report.md").read_text()
    assert "--launcher" not in (out / "report.md").read_text()
    rerun = ["compare", "--config", str(out / "config.yaml"), "--name", "again"]
    _, per_arm, _ = resolve_args(build_parser().parse_args(rerun))
    assert per_arm == {"full": {"lr": 3e-5}, "lora": {"lora_r": 4}}
    one = ["train", "--config", str(out / "config.yaml"), "--method", "lora", "--name", "x"]
    cfg, per_arm, _ = resolve_args(build_parser().parse_args(one))  # full.lr: not refused
    assert per_arm["lora"] == {"lora_r": 4}


def test_confound_list_flags_any_difference_but_method():
    def arm(method: str, lr: float) -> dict:
        return {"status": "ok", "config": {"method": method, "lr": lr}, "runtime": {},
                "versions": {"torch": "2"}, "data": {}, "git_sha": "abc"}  # fmt: skip

    found = confounds({"lora": arm("lora", 1e-4), "full": arm("full", 2e-5)})
    rows = {key: expected for key, _, expected in found}
    assert rows == {"config.method": True, "config.lr": False}


def test_the_saved_config_reruns_as_a_new_run_under_another_name(run_dir):
    """config.yaml keeps no output_dir: `compare --config it --name again` is a new run."""
    from tuneoff.cli import build_parser
    from tuneoff.runs import resolve_args, run_dir_of

    assert "output_dir: null" in (run_dir / "config.yaml").read_text()
    args = build_parser().parse_args(
        ["compare", "--config", str(run_dir / "config.yaml"), "--name", "again"]
    )
    cfg, _, _ = resolve_args(args)
    assert str(run_dir_of(cfg)) == "runs/again"
    assert cfg.limit == 400 and cfg.max_steps == 8  # the rest as saved


def test_generate_takes_a_full_arm_directory_as_model(run_dir, capsys):
    assert main(["generate", "--model", str(run_dir / "full"), "Add 2 and 3.",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip()
