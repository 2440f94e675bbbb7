"""`tuneoff merge` and the deployment figures: merged logits equal base + adapter (fp32, at most
1e-4), merged weights equal W + BA * scale, NaN/Inf refused, a QLoRA adapter merged onto the
dequantized 4-bit base, a merged model and a tuneoff adapter that plain transformers/PEFT load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tuneoff.cli import main
from tuneoff.embedded import TINY_MODEL_DIR
from tuneoff.merge import measure_deployment, merge_adapter
from tuneoff.model import ModelError

TRAIN = ["--limit", "120", "--max-steps", "8", "--no-report", "epochs=1", "gen_examples=2",
         "eval_every=0", "val_fraction=0.05", "test_fraction=0.05", "eval_train_examples=4",
         "save_checkpoints=false", "lr=0.02", "warmup_steps=0"]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with one lora arm trained by `tuneoff train` (a few steps at a high lr, so that
    the adapter moves the logits far more than the merge tolerance)."""
    run = tmp_path_factory.mktemp("merge") / "run"
    assert main(["train", "--method", "lora", "--output-dir", str(run), *TRAIN]) == 0
    return run


def test_inspect_of_a_run_made_by_train(run_dir, capsys):
    """`train` writes config.yaml in the arm only: inspecting the run reads it from there."""
    assert not (run_dir / "config.yaml").exists()
    assert main(["inspect", str(run_dir), "--split", "val", "--limit", "1"]) == 0
    assert "--- val[0]" in capsys.readouterr().out
    for limit in ("0", "-2"):  # were: nothing printed, and all but the last 2 examples
        assert main(["inspect", str(run_dir), "--limit", limit]) == 2
        out, err = capsys.readouterr()
        assert not out and "--limit" in err and len(err.strip().splitlines()) == 1


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_help_of_the_deploy_commands(capsys):
    for command in ("merge", "generate", "serve"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: tuneoff" in capsys.readouterr().out


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "model"
    assert main(["merge", str(run_dir / "lora"), "--out", str(out)]) == 0
    return out


def test_merged_model_loads_in_plain_transformers_and_matches_peft(run_dir, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report = json.loads((merged / "merge.json").read_text())
    assert report["max_abs_diff"] <= 1e-4 and report["max_abs_diff_reloaded"] <= 1e-4
    assert report["examples"] == 4 and not report["quantized_base"]
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.bin"))
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    adapted = PeftModel.from_pretrained(base, run_dir / "lora" / "adapter")  # a tuneoff adapter
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with adapted.disable_adapter():
        base_logits = logits(adapted, ids)
    peft_logits = logits(adapted, ids)
    assert (peft_logits - base_logits).abs().max() > 0.05  # the adapter matters
    assert (logits(model, ids) - peft_logits).abs().max() <= 1e-4


def test_merged_weight_is_w_plus_ba_times_scale(run_dir, merged):
    adapter = run_dir / "lora" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    lora = load_file(adapter / "adapter_model.safetensors")
    base = load_file(TINY_MODEL_DIR / "model.safetensors")
    weights = load_file(merged / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    a = lora[f"base_model.model.{name.replace('.weight', '.lora_A.weight')}"]
    b = lora[f"base_model.model.{name.replace('.weight', '.lora_B.weight')}"]
    assert b.abs().max() > 0
    torch.testing.assert_close(weights[name], base[name] + scale * b @ a, rtol=0, atol=1e-6)


def test_nan_in_the_adapter_is_refused_and_nothing_written(run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "lora" / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(ModelError, match="NaN"):
        merge_adapter(adapter, tmp_path / "out", model="embedded:tiny-qwen2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


DAMAGED = [  # a damaged adapter file, what it holds, and what the one-line error says of it
    ("adapter_model.safetensors", b"not a safetensors file", "is not a readable safetensors"),
    ("adapter_config.json", b"{bad", "is not valid JSON"),
    ("adapter_config.json", b"[1]", "holds a JSON list"),
]


@pytest.mark.parametrize("name, content, fragment", DAMAGED, ids=["weights", "json", "list"])
def test_a_damaged_adapter_is_a_one_line_error(name, content, fragment, run_dir, tmp_path, capsys):
    """Was a traceback from safetensors, json or `.get` on a list."""
    arm = tmp_path / "lora"
    shutil.copytree(run_dir / "lora", arm)
    (arm / "adapter" / name).write_bytes(content)
    assert main(["merge", str(arm), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("tuneoff: error:") == 1 and "Traceback" not in err
    assert f"{arm / 'adapter' / name} {fragment}" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    "change, fragment",
    [({"r": "x"}, "'r' is 'x'"), ({"lora_alpha": [1]}, "'lora_alpha' is [1]"),
     ({"target_modules": 5}, "'target_modules' is 5")],
)  # fmt: skip
def test_lora_settings_of_the_wrong_type_are_one_line(change, fragment, run_dir, tmp_path, capsys):
    """peft reads them unchecked: a TypeError deep in building the model, before."""
    arm = tmp_path / "lora"
    shutil.copytree(run_dir / "lora", arm)
    config = arm / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    assert main(["merge", str(arm), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("tuneoff: error:") == 1 and fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    "out, fragment",
    [("", "--out is empty"), ("/proc/tuneoff-merge/out", "cannot be created")],
)
def test_an_out_that_cannot_be_a_directory_is_a_one_line_error(out, fragment, run_dir, capsys):
    """`--out ''` said ". already exists"; /proc takes no directories, not even from root (a
    mkdir traceback after the whole merge was computed)."""
    if out.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    assert main(["merge", str(run_dir / "lora"), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuneoff: error:") and fragment in err and len(err.splitlines()) == 1


def test_overwrite_rules_and_bf16_output(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    args = ["merge", str(run_dir / "lora"), "--out", str(out), "--dtype", "bf16"]
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 2
    assert "not a tuneoff merge output" in capsys.readouterr().err
    (out / "keep.txt").unlink()
    (out / "merge.json").write_text("{}")  # an earlier merge output may be replaced
    partial = tmp_path / "merged.partial"  # where merge writes first: a user's directory...
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2
    assert "not a tuneoff merge in progress" in capsys.readouterr().err
    assert (partial / "keep.txt").read_text() == "mine"
    (partial / "keep.txt").unlink()
    (partial / "tuneoff-merge-partial").write_text("")  # ...or a crashed merge's, replaced
    (partial / "model.safetensors").write_text("half")
    assert main([*args, "--overwrite"]) == 0
    assert not partial.exists() and not (out / "tuneoff-merge-partial").exists()
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    report = json.loads((out / "merge.json").read_text())
    assert report["dtype"] == "bf16" and report["max_abs_diff"] <= 1e-4


def test_qlora_adapter_merges_onto_the_dequantized_4bit_base(run_dir, tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA merge needs bitsandbytes")
    run = tmp_path / "run"  # a qlora arm trained by `tuneoff train` beside the lora arm
    shutil.copytree(run_dir, run)
    assert main(["train", "--method", "qlora", "--output-dir", str(run), *TRAIN]) == 0
    arm = run / "qlora"
    assert (arm / "adapter" / "adapter_config.json").is_file()  # where merge and serve look
    report = merge_adapter(arm, tmp_path / "merged")
    assert report["quantized_base"]
    assert report["max_abs_diff"] <= 1e-4  # the merge itself, on the dequantized base
    assert 0 < report["max_abs_diff_vs_4bit"] < report["max_abs_diff_vs_full"] < float("inf")
    name = "model.layers.0.self_attn.v_proj.weight"
    base = load_file(TINY_MODEL_DIR / "model.safetensors")[name]
    merged = load_file(tmp_path / "merged" / "model.safetensors")[name]
    quantized, state = bnb.functional.quantize_4bit(
        base, quant_type="nf4", compress_statistics=True
    )
    dequantized = bnb.functional.dequantize_4bit(quantized, state)
    lora = load_file(arm / "adapter" / "adapter_model.safetensors")
    prefix = f"base_model.model.{name.removesuffix('.weight')}"
    delta = lora[f"{prefix}.lora_B.weight"] @ lora[f"{prefix}.lora_A.weight"]
    config = json.loads((arm / "adapter" / "adapter_config.json").read_text())
    expected = dequantized + config["lora_alpha"] / config["r"] * delta
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_deployment_figures_and_report_section(run_dir):
    from tuneoff.report import deployment_section

    figures = measure_deployment(run_dir, repeats=5)
    assert json.loads((run_dir / "deployment.json").read_text()) == figures
    lora = figures["arms"]["lora"]
    assert 0 < lora["adapter_bytes"] < figures["base_bytes"]
    assert lora["adapter_bytes_on_disk"] >= lora["adapter_bytes"]  # plus the header
    assert figures["base_bytes"] == figures["base_params"] * 4  # fp32 stored
    three = lora["memory_bytes"]["3"]
    assert three["one_base_n_adapters"] == figures["base_bytes"] + 3 * lora["adapter_bytes"]
    assert three["n_merged"] == 3 * figures["base_bytes"] > three["one_base_n_adapters"]
    assert figures["switch"]["set_adapter_ms"] > 0 and figures["switch"]["forward_ms"] > 0
    section = deployment_section(run_dir)
    assert "| Adapter on disk (safetensors) |" in section and "Adapter switch on cpu" in section
