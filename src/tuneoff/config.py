"""Typed run configuration: defaults, presets, YAML files and `key=value` overrides.

`Config` is the single source of truth. A preset is a YAML file under `presets/`; a user YAML
file and command-line overrides are applied on top, in that order. Every value is converted to
its field's type and validated in `__post_init__`, so a bad key or value is one clear error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
METHODS = ("base", "lora", "qlora", "full")
TRAINING_METHODS = ("lora", "qlora", "full")
ADAPTER_METHODS = ("lora", "qlora")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("linear", "cosine", "constant")
WEIGHT_DTYPES = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "adamw_lean")
BATCHING = ("packed", "longest", "padded")
PACKED_ATTENTION = ("varlen", "mask")
# What determines a run's split (every arm trains and evaluates on one `splits/`).
SPLIT_KEYS = ("dataset", "dataset_split", "dataset_config", "limit", "seed", "val_fraction",
              "test_fraction")  # fmt: skip
# Keys no single arm may override: the split, and which run and arm this is.
RUN_KEYS = (*SPLIT_KEYS, "method", "methods", "name", "output_dir")
# Keys a --resume may change: none changes what is trained or how (the rest must stay the arm's).
RESUMABLE_KEYS = ("max_steps", "methods", "name", "output_dir", "num_workers", "eval_every",
                  "eval_batch_size", "eval_train_examples", "gen_examples", "gen_max_new_tokens",
                  "gen_batch_size", "log_every", "save_checkpoints", "memory_budget",
                  "compile")  # fmt: skip
SIZE_UNITS = {"b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
SIZE_UNITS.update({"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20})
SIZE_UNITS.update({"g": 2**30, "t": 2**40})


class ConfigError(ValueError):
    """A user-caused configuration problem; the CLI prints it as one line."""


@dataclass
class Config:
    # What to train on.
    model: str = "Qwen/Qwen2.5-1.5B-Instruct"
    dataset: str = "yahma/alpaca-cleaned"
    dataset_split: str = "train"
    dataset_config: str | None = None
    name: str | None = None
    output_dir: str | None = None
    method: str = "lora"
    methods: list[str] = field(default_factory=lambda: ["lora", "full"])
    # Data.
    max_seq_len: int = 256
    train_on_prompt: bool = False
    val_fraction: float = 0.02
    test_fraction: float = 0.02
    limit: int | None = None
    seed: int = 42
    num_workers: int = 0
    # Optimization (the reference's values are the defaults).
    epochs: int = 3
    batch_size: int = 4
    grad_accum: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    warmup_steps: int = 100
    lr_schedule: str = "linear"
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    precision: str = "auto"  # auto: GPU bf16 autocast, else fp16; CPU: see choose_runtime
    device: str = "auto"
    # LoRA (ignored by other methods).
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    # Evaluation.
    eval_every: int = 0
    eval_batch_size: int = 8
    eval_train_examples: int | None = None
    gen_examples: int = 32
    gen_max_new_tokens: int = 64
    gen_batch_size: int = 16
    log_every: int = 1
    save_checkpoints: bool = True
    # Memory and speed. The defaults are tuneoff's fast path; none of them changes the math of
    # an update except weights_dtype (bf16/fp16 frozen or master weights) and the optimizer.
    weights_dtype: str = "auto"  # auto: frozen weights in the autocast dtype, full: fp32
    gradient_checkpointing: bool = False
    loss_chunk_size: int = 512  # supervised tokens per lm-head chunk; 0: full-vocab logits
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | adamw_lean (bf16 states)
    fused_optimizer: bool = True  # fused AdamW kernel, CUDA and CPU (false: torch's foreach)
    memory_budget: str | None = None  # e.g. 16GiB: caps this process's CUDA memory
    batching: str = "packed"  # packed (no padding) | longest (pad to batch max) | padded
    # > 0: an optimizer step's examples (batch_size x grad_accum per process) are cut, in
    # order, into micro-batches of at most this many tokens (slots where rows are padded)
    # instead of batch_size examples: the same examples and update, a bounded micro-batch.
    # At least max_seq_len (one example may be that long). 0: batch_size examples each.
    micro_batch_tokens: int = 0
    # packed rows: varlen (attention per example, one row per micro-batch) | mask (sdpa with a
    # block-diagonal mask over rows of about max_seq_len)
    packed_attention: str = "varlen"
    fast_dropout: bool = True  # CPU: LoRA dropout masks from numpy's SFC64 (false: torch's)
    # recompute SwiGLU, RMSNorm and LoRA-dropout intermediates in backward, keep one copy of
    # alike casts (`lean.py`, `lora_layers.py`)
    lean_activations: bool = True
    group_by_length: bool = False  # batches of similar lengths (less padding with longest)
    compile: bool = False  # torch.compile the model

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), _field_types()[f.name]))
        self._validate()

    def _validate(self) -> None:
        _one_of("method", self.method, METHODS)
        for m in self.methods:
            _one_of("methods", m, TRAINING_METHODS)
        if len(set(self.methods)) != len(self.methods) or not self.methods:
            raise ConfigError(f"config key 'methods': {self.methods} must be non-empty, no repeats")
        _one_of("precision", self.precision, PRECISIONS)
        _one_of("device", self.device, DEVICES)
        _one_of("lr_schedule", self.lr_schedule, SCHEDULES)
        _one_of("weights_dtype", self.weights_dtype, WEIGHT_DTYPES)
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        _one_of("batching", self.batching, BATCHING)
        _one_of("packed_attention", self.packed_attention, PACKED_ATTENTION)
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "memory_budget")
        positive = ("max_seq_len", "epochs", "batch_size", "grad_accum", "eval_batch_size")
        positive += ("gen_batch_size", "log_every", "lora_r")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}': must be >= 1, got {getattr(self, key)}")
        nonneg = ("weight_decay", "warmup_steps", "max_grad_norm", "eval_every", "num_workers")
        nonneg += ("gen_examples", "gen_max_new_tokens", "lr", "lora_alpha", "loss_chunk_size")
        nonneg += ("micro_batch_tokens",)
        for key in nonneg:
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{key}': must be >= 0, got {getattr(self, key)}")
        for key in ("limit", "max_steps", "eval_train_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"config key '{key}': must be >= 1 or null, got {value}")
        for key in ("val_fraction", "test_fraction", "lora_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(
                    f"config key '{key}': must be in [0, 1), got {getattr(self, key)}"
                )
        if not 0 <= self.seed < 2**32:  # numpy's and the data loader's generators take these
            raise ConfigError(f"config key 'seed': must be in [0, 2**32), got {self.seed}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ConfigError("config keys 'val_fraction' + 'test_fraction' must be below 1")
        if 0 < self.micro_batch_tokens < self.max_seq_len:
            raise ConfigError(
                f"config key 'micro_batch_tokens': {self.micro_batch_tokens} is below max_seq_len "
                f"({self.max_seq_len}), which one example may fill; use 0 (off) or at least that"
            )
        if not self.lora_target_modules:
            raise ConfigError("config key 'lora_target_modules': name at least one module")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> Config:
        return Config(**{**self.to_dict(), **changes})


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(allowed)}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise ConfigError."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `T | None`
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        kind = next(a for a in args if a is not type(None))
        args = typing.get_args(kind)
    if typing.get_origin(kind) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
    try:
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):  # nan passes every range check; inf trains to nan
                raise ConfigError(f"config key '{key}': must be a finite number, got {value!r}")
            return number
        if kind is str:
            if isinstance(value, (dict, list)) or value is None:
                raise ValueError
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"config key '{key}': expected {name}, got {value!r}") from None
    return value


def parse_size(text: str | int | float, where: str = "size") -> int:
    """'16GiB', '16G', '1.5 GiB', '500MB' or '4096B' -> bytes (GiB = 2**30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match and not match.group(2):
        # A bare number was read as bytes, so `--gpu-memory 16` meant 16 bytes: ask for a unit.
        example = match.group(1) if float(match.group(1)) > 0 else "16"
        raise ConfigError(f"{where}: {text!r} has no unit: give one, e.g. {example}GiB")
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ConfigError(
            f"{where}: {text!r} is not a memory size; write it like 16GiB, 24GB or 8000MiB"
        )
    value, unit = float(match.group(1)), match.group(2).lower()
    if value <= 0:
        raise ConfigError(f"{where}: {text!r} must be above zero")
    return int(value * SIZE_UNITS[unit])


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: pass a YAML file to --config")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: not a text file; pass a YAML file") from None
    except yaml.YAMLError as err:
        # str(err) spans several lines (PyYAML draws a caret under the source): keep one line.
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or "cannot be parsed"
        if getattr(err, "context", None):
            problem = f"{problem} ({err.context})"
        problem = " ".join(problem.split())
        raise ConfigError(f"config file {path}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of key: value at the top level")
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["lr=1e-4", "full.lr=2e-5"]` -> `{"lr": 1e-4, "full.lr": 2e-5}` (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value, e.g. lr=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def check_keys(values: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(Config)}
    for key in values:
        base = key.split(".", 1)[1] if "." in key and key.split(".")[0] in METHODS else key
        if base not in known:
            close = [k for k in sorted(known) if base.replace("-", "_") == k or base in k]
            hint = f" (did you mean {close[0]}?)" if close else " (see `tuneoff train --help`)"
            raise ConfigError(f"{where}: unknown config key '{key}'{hint}")


def resolve(
    preset: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[Config, dict[str, dict[str, Any]]]:
    """Preset, then YAML file, then overrides. Returns the config and per-arm overrides
    (`full.lr=2e-5` applies to the full arm only; the report lists it as a confound)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in preset_names():
            raise ConfigError(
                f"unknown preset {preset!r}: choose one of {', '.join(preset_names())}"
            )
        values.update(read_yaml(PRESET_DIR / f"{preset}.yaml"))
    if config_file is not None:
        file_values = read_yaml(config_file)
        check_keys(file_values, f"config file {config_file}")
        values.update(file_values)
    if overrides:
        check_keys(overrides, "command line")
        values.update(overrides)
    per_arm: dict[str, dict[str, Any]] = {}
    for key in [k for k in values if "." in k]:
        arm, sub = key.split(".", 1)
        if sub in RUN_KEYS:
            raise ConfigError(
                f"{key}: {sub} is shared by every arm of a run (it fixes the split or names "
                f"the run); set {sub}=... without an arm prefix"
            )
        per_arm.setdefault(arm, {})[sub] = values.pop(key)
    cfg = Config(**values)
    for arm, arm_values in per_arm.items():
        arm_cfg = cfg.replace(**arm_values)  # validate now, not when the arm starts
        per_arm[arm] = {k: getattr(arm_cfg, k) for k in arm_values}
    return cfg, per_arm


def write_yaml(
    cfg: Config, path: Path, header: str = "", per_arm: dict[str, dict[str, Any]] | None = None
) -> None:
    """`cfg` as YAML, then the per-arm overrides as `arm.key` entries (as `resolve` reads them)."""
    values = cfg.to_dict()
    for arm, arm_values in (per_arm or {}).items():
        values.update({f"{arm}.{k}": v for k, v in arm_values.items()})
    text = yaml.safe_dump(values, sort_keys=False)
    path.write_text(header + text)
