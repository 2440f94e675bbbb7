"""Configuration: presets, YAML files, overrides, per-arm overrides and one-line errors."""

from __future__ import annotations

import pytest

from tuneoff.config import Config, ConfigError, parse_overrides, parse_size, preset_names, resolve


def test_seed_preset_holds_every_reference_value():
    cfg, _ = resolve("seed")
    expected = dict(
        model="Qwen/Qwen2.5-1.5B-Instruct",
        dataset="yahma/alpaca-cleaned",
        max_seq_len=256,
        epochs=3,
        batch_size=4,
        grad_accum=16,
        lr=2e-4,
        weight_decay=0.0,
        warmup_steps=100,
        max_grad_norm=1.0,
        precision="fp16",
        num_workers=16,
        val_fraction=0.02,
        test_fraction=0.02,
        lora_r=8,
        lora_alpha=32.0,
        lora_dropout=0.05,
        lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_presets_exist_and_tiny_is_embedded():
    assert {"seed", "tiny"} <= set(preset_names())
    cfg, _ = resolve("tiny")
    assert cfg.model.startswith("embedded:") and cfg.dataset.startswith("embedded:")


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("lr: 1.0e-3\nepochs: 2\n")
    cfg, per_arm = resolve("tiny", str(path), parse_overrides(["epochs=1", "full.lr=2e-5"]))
    assert cfg.lr == 1e-3 and cfg.epochs == 1
    assert per_arm == {"full": {"lr": 2e-5}}


def test_values_are_coerced_to_field_types():
    cfg = Config(lr="3e-4", epochs="2", train_on_prompt="true", lora_target_modules="q_proj,v_proj")
    assert cfg.lr == 3e-4 and cfg.epochs == 2 and cfg.train_on_prompt is True
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["lrr=1"], "unknown config key 'lrr'"),
        (["lr=abc"], "'lr': expected float"),
        (["epochs=0"], "'epochs': must be >= 1"),
        (["epochs=1.5"], "'epochs': expected int"),
        (["precision=fp8"], "'precision'"),
        (["methods=lora,qlorax"], "'methods'"),
        (["val_fraction=0.6", "test_fraction=0.5"], "below 1"),
        (["nokey"], "expected key=value"),
        (["bogus.lr=1"], "unknown config key"),
        (["lr=nan"], "'lr': must be a finite number"),
        (["lr=inf"], "'lr': must be a finite number"),
        (["lora_dropout=.nan"], "'lora_dropout': must be a finite number"),
        (["seed=-1"], "'seed': must be in [0, 2**32)"),
        (["seed=4294967296"], "'seed'"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        resolve("tiny", None, parse_overrides(overrides))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve("nope")
    with pytest.raises(ConfigError, match="not found"):
        resolve(None, "/nonexistent/my.yaml")


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        resolve(None, str(path))


def test_config_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        resolve(None, str(tmp_path))


@pytest.mark.parametrize(
    "text, where", [("lr: [1,\nepochs: 2\n", "line 3"), ("a: b: c\n", "line 1 column 5")]
)
def test_invalid_yaml_is_one_line_with_file_and_position(text, where, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        resolve(None, str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and where in message


def test_memory_sizes_need_a_unit():
    for budget in ("16", 16, 1.5):
        with pytest.raises(ConfigError, match="no unit"):
            Config(memory_budget=budget)
    assert Config(memory_budget="16GiB").memory_budget == "16GiB"


def test_a_size_without_unit_suggests_a_valid_one():
    with pytest.raises(ConfigError, match="e.g. 16GiB"):  # not "0GiB", which is refused too
        parse_size("0", "--gpu-memory")
    with pytest.raises(ConfigError, match="e.g. 24GiB"):
        parse_size("24", "--gpu-memory")
