"""Adapter directories: finding an adapter in a run or arm directory, reading and checking its
files before any model loads, its base model, and the adapters an operator's directory holds
(`adapter_in_dir`: never a path outside it).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from tuneoff.model import ModelError

log = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME.fullmatch(name) or ".." in name:
        raise ModelError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit (no '..')"
        )
    return name


def find_adapter_dir(path: Path) -> Path:
    """`path` itself when it holds a PEFT adapter, else `<path>/adapter` (a tuneoff arm dir)."""
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            missing = [f for f in ADAPTER_FILES if not (candidate / f).is_file()]
            if missing:  # adapter_model.bin would be unpickled: refused
                raise ModelError(
                    f"adapter {candidate}: no {missing[0]}; tuneoff loads safetensors adapters only"
                )
            return candidate
    raise ModelError(
        f"{path}: no PEFT adapter (adapter_config.json) here or in {path / 'adapter'}; "
        "pass an adapter directory or a lora/qlora arm directory of a run"
    )


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelError(
            f"{path} is not valid JSON ({err}): restore it, or save the adapter again"
        ) from None
    if not isinstance(config, dict):
        raise ModelError(
            f"{path} holds a JSON {type(config).__name__}, not an object of LoRA settings: "
            "restore it, or save the adapter again"
        )
    if config.get("peft_type") != "LORA":
        raise ModelError(
            f"adapter {adapter_dir}: peft_type {config.get('peft_type')!r}; only LoRA adapters "
            "can be merged or served"
        )
    problem = _lora_settings_problem(config)
    if problem:  # peft does not check types: it would fail later, deep in building the model
        raise ModelError(f"{path}: {problem}: restore it, or save the adapter again")
    return config


def _lora_settings_problem(config: dict[str, Any]) -> str | None:
    """What makes a LoRA config unusable: a rank, scale or dropout that is not a number in
    range, or target modules that are not module names."""

    def number(key: str) -> bool:
        value = config.get(key)
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if (
        not (isinstance(config.get("r"), int) and not isinstance(config["r"], bool))
        or config["r"] < 1
    ):
        return f"'r' is {config.get('r')!r}, not a rank >= 1"
    for key in ("lora_alpha", "lora_dropout"):
        if key in config and not number(key):
            return f"{key!r} is {config[key]!r}, not a number"
    targets = config.get("target_modules")
    names = [targets] if isinstance(targets, str) else targets
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        return f"'target_modules' is {targets!r}, not module names"
    return None


def check_adapter(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's config, after checking that its weights file is readable safetensors (its
    header and size, without loading a tensor), so that a damaged adapter is a ModelError naming
    the file before any model is loaded."""
    from safetensors import SafetensorError, safe_open

    config = read_adapter_config(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    try:
        with safe_open(path, framework="pt") as weights:
            weights.keys()
    except SafetensorError as err:
        raise ModelError(
            f"{path} is not a readable safetensors file ({error_detail(err)}): restore it, or "
            "train the adapter again"
        ) from None
    return config


def arm_config(adapter_dir: Path) -> dict[str, Any]:
    """The arm's config.yaml (model, method) when the adapter sits in a tuneoff arm dir."""
    from tuneoff.config import read_yaml

    path = adapter_dir.parent / "config.yaml"
    return read_yaml(path) if path.is_file() else {}


def base_model_of(adapter_dir: Path) -> str:
    """The base model an adapter was trained on: the arm's config, else the adapter's config."""
    name = arm_config(adapter_dir).get("model") or read_adapter_config(adapter_dir).get(
        "base_model_name_or_path"
    )
    if not name:
        raise ModelError(f"adapter {adapter_dir}: base model unknown; pass --model")
    return name


def arm_model(model: str | None) -> str | None:
    """--model may name a full arm's directory (runs/x/full), as --adapter names a lora arm's."""
    if model and not Path(model, "config.json").is_file() and Path(model, "model").is_dir():
        return str(Path(model, "model"))
    return model


def model_name(model: str) -> str:
    """The name a model is served under: a local directory by its name (of `.` too), never its
    path; a hub id as given."""
    return Path(os.path.abspath(model)).name if Path(model).is_dir() else model


def adapter_in_dir(root: Path, relative: str) -> Path:
    """`root/relative` as an adapter directory that provably stays inside `root`: no absolute
    paths, no '..', and no symlink (of the directory or of its files) resolving outside."""
    if not relative or Path(relative).is_absolute() or ".." in Path(relative).parts:
        raise ModelError(f"adapter path {relative!r}: must be relative to the adapters directory")
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ModelError(f"adapter path {relative!r} resolves outside the adapters directory")
    adapter = find_adapter_dir(path)
    for name in ADAPTER_FILES:
        if not (adapter / name).resolve().is_relative_to(root):
            raise ModelError(f"adapter path {relative!r}: {name} links outside the adapters dir")
    return adapter


def scan_adapters_dir(root: Path) -> dict[str, Path]:
    """Every valid adapter directly under `root`, named by its directory. Entries that are not
    adapters, have a bad name, or link outside `root` are skipped with a warning."""
    if not root.is_dir():
        raise ModelError(f"adapters directory {root} not found: pass an existing directory")
    found = {}
    for entry in sorted(root.iterdir()):
        try:
            found[check_adapter_name(entry.name)] = adapter_in_dir(root, entry.name)
        except ModelError as err:
            log.warning("skipped %s: %s", entry, err)
    return found


def error_detail(err: BaseException, width: int = 300) -> str:
    """An exception's message on one line: its first line, and when that only announces a list
    (torch's "Error(s) in loading state_dict for X:"), the first item of the list too."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"[:width]
    return lines[0][:width]
