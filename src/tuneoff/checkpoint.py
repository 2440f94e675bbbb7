"""Epoch-end checkpoints for `--resume`: trainable weights, optimizer state and RNG states in
safetensors, everything else in JSON. Never pickle.

Weights and optimizer state go through torch's distributed state-dict API as whole tensors named
by parameter, so one format serves one process, DDP and FSDP (whose shards are gathered to the
main process to save and cut again from the whole tensors on resume), whatever the world size.
Under DeepSpeed, whose ZeRO optimizer keeps fp32 master weights and moments in flat partitions
of its own, the engine writes those (its format, `torch.save`d tensors; resumed on as many
processes) and the rest is as above."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def save_checkpoint(path: Path, model, optimizer, scheduler, accelerator, state: Any) -> None:
    """Trainable weights, optimizer state and RNG in safetensors, the rest in JSON (no pickle).
    Every process calls it (FSDP gathers shards); the main process writes, to a temporary
    directory renamed at the end, so a crash never leaves half a checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp = path.with_name(path.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        tmp.mkdir(parents=True)
    unwrapped = accelerator.unwrap_model(model)
    deepspeed = is_deepspeed(accelerator)
    if deepspeed:  # every process writes its partition of the optimizer
        accelerator.wait_for_everyone()
        model.save_checkpoint(str(tmp / "deepspeed"), tag="last", exclude_frozen_parameters=True)
        weights, opt = {}, {"state": {}, "param_groups": []}
    else:
        opts = _options(cpu_offload=True)
        weights, opt = get_state_dict(unwrapped, _inner(optimizer), options=opts)
    rngs = [_rng_state()]  # each process's own: their dropout draws differ
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rngs = gather_object(rngs)
    if not accelerator.is_main_process:
        return
    names = _trainable(unwrapped)  # a tied head once, a frozen tied head not at all
    weights = {n: w.contiguous() for n, w in weights.items() if n in names}
    if not deepspeed:
        save_file(weights, tmp / "trainable.safetensors")
    # Parameter names contain dots, the optimizer's state keys (step, exp_avg, ...) do not.
    tensors = {
        f"{name}.{k}": v.contiguous()
        for name, s in opt["state"].items()
        for k, v in s.items()
        if torch.is_tensor(v)
    }
    for rank, rng in enumerate(rngs):
        tensors.update({f"rng.{rank}.{device}": state for device, state in rng.items()})
    save_file(tensors, tmp / "optimizer.safetensors")
    share_like_other_files(tmp)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    meta = {
        "format": 2,  # 1: keyed by parameter index, one RNG state (before 2026-11-29)
        "train_state": asdict(state),
        "param_groups": opt["param_groups"],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler,
        "deepspeed_processes": accelerator.num_processes if deepspeed else None,
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        shutil.rmtree(old)


class CheckpointError(ValueError):
    """A checkpoint this model or this version of tuneoff cannot resume from."""


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    """Restores what `save_checkpoint` wrote; every process reads the files and keeps its part."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = json.loads((path / "state.json").read_text())
    if meta.get("format") != 2:
        raise CheckpointError(
            f"checkpoint {path} was written by an older tuneoff: rerun without --resume "
            "(with --overwrite) to start the arm again"
        )
    unwrapped = accelerator.unwrap_model(model)
    tensors = load_file(path / "optimizer.safetensors")
    rngs = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith("rng.")]}
    _restore_rng(rngs, accelerator.process_index)
    scheduler.load_state_dict(meta["scheduler"])
    if _load_deepspeed(path, meta, model, accelerator):
        return meta["train_state"]
    weights = load_file(path / "trainable.safetensors")
    if set(weights) != _trainable(unwrapped):
        odd = sorted(set(weights) ^ _trainable(unwrapped))[:3]
        raise CheckpointError(
            f"checkpoint {path} does not hold this arm's trainable weights (differ: {odd}): "
            "rerun without --resume (with --overwrite) to start the arm again"
        )
    opt_state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, k = key.rsplit(".", 1)
        opt_state.setdefault(name, {})[k] = value
    set_state_dict(
        unwrapped,
        _inner(optimizer),
        model_state_dict=weights,
        optim_state_dict={"state": opt_state, "param_groups": meta["param_groups"]},
        options=_options(strict=False),  # checked above; tied weights are saved once
    )
    if meta["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(meta["scaler"])
    return meta["train_state"]


def _restore_rng(rngs: dict[str, torch.Tensor], rank: int) -> None:
    rank = rank if f"rng.{rank}.cpu" in rngs else 0
    torch.set_rng_state(rngs[f"rng.{rank}.cpu"])  # another world size: rank 0's
    if f"rng.{rank}.cuda" in rngs and torch.cuda.is_available():
        torch.cuda.set_rng_state(rngs[f"rng.{rank}.cuda"])


def _load_deepspeed(path: Path, meta: dict, model, accelerator) -> bool:
    """Restores weights and optimizer from DeepSpeed's part of a checkpoint; False when the
    checkpoint has none (and the run is not under DeepSpeed either)."""
    saved, now = meta.get("deepspeed_processes"), is_deepspeed(accelerator)
    if not saved and not now:
        return False
    again = "rerun without --resume (with --overwrite) to start the arm again"
    if not saved:
        raise CheckpointError(
            f"checkpoint {path} was written without DeepSpeed: resume it without DeepSpeed, "
            f"or {again}"
        )
    if not now or saved != accelerator.num_processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} DeepSpeed processes: resume it under "
            f"DeepSpeed on {saved} (ZeRO's partitions are per process), or {again}"
        )
    loaded, _ = model.load_checkpoint(
        str(path / "deepspeed"), tag="last", load_module_strict=False,
        load_optimizer_states=True, load_lr_scheduler_states=False,
    )  # fmt: skip
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint in {path / 'deepspeed'}: {again}")
    return True


def gather_weights(model, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """Whole weights on the main process's CPU from a model that FSDP sharded or DeepSpeed's ZeRO
    manages (every process calls it). None where weights are whole: save them as they are."""
    from torch.distributed.tensor import DTensor

    if any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in model.parameters()):
        return _deepspeed_weights(model, trainable_only)
    if not any(isinstance(p, DTensor) for p in model.parameters()):  # FSDP2 shards into DTensors
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only
    )
    weights = get_model_state_dict(model, options=options)
    # Tied weights come back as separate copies under each name: keep one (the checkpoint the
    # model loads from re-ties them), as save_pretrained does for unsharded models.
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    aliases = every - {n for n, _ in model.named_parameters()}
    return {n: w for n, w in weights.items() if n not in aliases}


def _deepspeed_weights(model, trainable_only: bool) -> dict[str, torch.Tensor]:
    """DeepSpeed ZeRO's fp32 master weights, not the bf16/fp16 copies the model computes with
    (every process calls it: each holds part of the masters; under ZeRO-3, of the weights)."""
    from deepspeed.runtime.zero import GatheredParameters
    from deepspeed.utils import safe_get_full_fp32_param

    module = getattr(model, "module", model)
    weights = {}
    for name, p in module.named_parameters():  # a tied weight once
        if p.requires_grad:
            weights[name] = safe_get_full_fp32_param(p).cpu()
        elif not trainable_only:
            with GatheredParameters([p]):  # no-op unless ZeRO-3 partitioned it
                weights[name] = p.detach().cpu().clone()
    return weights


def is_deepspeed(accelerator) -> bool:
    """Launched with DeepSpeed (ZeRO stage 1, 2 or 3: others are refused by `runs.check_launch`)."""
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage; 0 when not under DeepSpeed."""
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else 0


def share_like_other_files(directory: Path) -> None:
    """safetensors writes its files 0600 whatever the umask (through a temporary file): give
    them the mode every other file gets, so that others who may read the run can load them."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*.safetensors"):
        path.chmod(0o666 & ~umask)


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _inner(optimizer):
    """The torch optimizer under Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
