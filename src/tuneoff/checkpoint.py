"""Epoch-end checkpoints for `--resume`: trainable weights, optimizer state and RNG states in
safetensors, everything else in JSON. Never pickle."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, model, optimizer, scheduler, accelerator, state: Any) -> None:
    """Trainable weights, optimizer state and RNG in safetensors, the rest in JSON (no pickle).
    Written to a temporary directory and renamed, so a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    weights = {
        n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad
    }
    save_file(weights, tmp / "trainable.safetensors")
    opt = optimizer.state_dict()
    tensors = {
        f"{pid}.{k}": v.contiguous()
        for pid, s in opt["state"].items()
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, tmp / "optimizer.safetensors")
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    meta = {
        "train_state": asdict(state),
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    unwrapped = accelerator.unwrap_model(model)
    weights = load_file(path / "trainable.safetensors", device=str(accelerator.device))
    missing = set(weights) - {n for n, _ in unwrapped.named_parameters()}
    if missing:
        raise ValueError(f"checkpoint {path} has weights this model lacks: {sorted(missing)[:3]}")
    unwrapped.load_state_dict(weights, strict=False)
    meta = json.loads((path / "state.json").read_text())
    tensors = load_file(path / "optimizer.safetensors", device=str(accelerator.device))
    torch.set_rng_state(tensors.pop("rng.cpu").cpu())
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng.cpu())
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    if meta["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    return meta["train_state"]
