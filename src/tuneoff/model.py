"""Models: device and precision choice, loading, and `prepare_model`, the one place where
methods differ (full: every weight trainable; lora: frozen base plus a PEFT adapter; base: frozen).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneoff.config import Config

log = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:tiny-qwen2"


class ModelError(ValueError):
    """A user-caused model problem (not found, offline); the CLI prints it as one line."""


@dataclass
class Runtime:
    device: str  # "cpu" or "cuda"
    precision: str  # "fp32", "fp16" (autocast + GradScaler) or "bf16" (autocast)
    reason: str

    @property
    def mixed_precision(self) -> str:
        """The value accelerate's `Accelerator(mixed_precision=...)` takes."""
        return {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[self.precision]


def choose_runtime(cfg: Config) -> Runtime:
    """Device and precision chosen in one place, with the reason printed at start."""
    has_cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not has_cuda:
        raise ModelError("device=cuda was asked for but CUDA is not available; use device=auto")
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and has_cuda)) else "cpu"
    if device == "cpu":
        if cfg.precision in ("fp16", "bf16"):
            reason = f"{cfg.precision} autocast was asked for, but on CPU tuneoff trains in fp32"
            return Runtime("cpu", "fp32", reason)
        return Runtime("cpu", "fp32", "CPU: fp32 weights and arithmetic")
    bf16_ok = torch.cuda.is_bf16_supported()
    if cfg.precision == "auto":
        if bf16_ok:
            return Runtime("cuda", "bf16", "auto: this GPU supports bf16 autocast")
        return Runtime("cuda", "fp16", "auto: no bf16 on this GPU, fp16 autocast + GradScaler")
    if cfg.precision == "bf16" and not bf16_ok:
        raise ModelError("precision=bf16 but this GPU has no bf16 support; use precision=fp16")
    reasons = {
        "fp16": "asked: fp32 weights, fp16 autocast + GradScaler",
        "bf16": "asked: fp32 weights, bf16 autocast",
        "fp32": "asked: fp32 weights and arithmetic",
    }
    return Runtime("cuda", cfg.precision, reasons[cfg.precision])


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED_MODEL:
        from tuneoff.embedded import TINY_MODEL_DIR

        return str(TINY_MODEL_DIR)
    return name


def _not_found(name: str, err: Exception) -> ModelError:
    first = (str(err).splitlines() or [type(err).__name__])[0][:160]
    if Path(name).expanduser().exists():
        return ModelError(f"model {name}: cannot be loaded from this directory ({first})")
    return ModelError(
        f"model {name!r} is not a local directory and could not be fetched from the hub "
        f"({first}); offline, download it elsewhere and pass its directory: --model ./my-model"
    )


def load_tokenizer(name: str) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None
    if tokenizer.pad_token_id is None:
        # Safe because labels are built from the data, never from input_ids == pad.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_model(name: str) -> None:
    """Fail early (and cheaply: config only) if the model cannot be found."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolve_model_path(name))
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None


def load_model(name: str) -> torch.nn.Module:
    """fp32 weights: the reference's recipe (fp32 master weights, autocast for compute)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise _not_found(name, err) from None


def prepare_model(model: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The only place where methods differ."""
    if cfg.method == "base":
        model.requires_grad_(False)
        return model
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ModelError(
            f"config key 'lora_target_modules': {cfg.lora_target_modules} do not match the "
            f"model's modules ({str(err).splitlines()[0][:120]})"
        ) from None


def count_parameters(model: torch.nn.Module) -> dict[str, float]:
    """Trainable and total parameters; tied weights are counted once."""
    params = list(model.parameters())  # de-duplicates shared (tied) tensors
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {
        "trainable": trainable,
        "total": total,
        "trainable_pct": 100.0 * trainable / total if total else 0.0,
    }
