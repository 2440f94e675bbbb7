"""Run directories and the comparison: where a run lives, what may be replaced (only a
tuneoff run, never anything else a user had), and `compare`, which runs each arm in a process
of its own (`python -m tuneoff train`), so that its peak memory is its own and its failure (an
OOM, a crash) becomes a row of the report instead of the end of the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tuneoff.config import Config, ConfigError, parse_overrides, resolve

log = logging.getLogger(__name__)

MARKER = "tuneoff-run.json"  # only directories holding it may be replaced by --overwrite


class UsageError(ValueError):
    """A user-caused problem with a command's arguments or its run directory; one line."""


def run_dir_of(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    name = str(cfg.name)
    # A name is one directory under runs/: "" or "../x" would make runs/ itself, or a place
    # outside it, the run that --overwrite may delete.
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise UsageError(
            f"--name {name!r}: a run name is one directory under runs/ (no '/', not empty); "
            "pass --output-dir for a path"
        )
    return Path("runs") / name


def check_dir(path: Path, overwrite: bool, resume: bool) -> bool:
    """May `path` be used? True if it holds a run to replace (--overwrite). Raises otherwise.
    Only a tuneoff run may be replaced: nothing a user had is deleted or silently overwritten."""
    check_not_a_file(path, "--output-dir")
    if resume and not (path / MARKER).is_file():
        raise UsageError(f"no tuneoff run at {path} to resume: pass its --output-dir or --name")
    if not path.exists() or not any(path.iterdir()):
        return False
    is_run = (path / MARKER).is_file()
    if resume and is_run:
        return False
    if not overwrite:
        raise UsageError(
            f"{path} already exists: pass --overwrite to replace it, --resume to "
            "continue it, or choose another --output-dir / --name"
        )
    if not is_run:
        raise UsageError(
            f"{path} exists and is not a tuneoff run; refusing to delete it with "
            "--overwrite: choose another --output-dir"
        )
    return True


def check_not_a_file(path: Path, flag: str) -> None:
    """An output directory (or one above it) that is an existing file: one line, file untouched."""
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise UsageError(f"{flag} {path}: {blocked} is a file, not a directory; choose another")


def claim_dir(path: Path, replace: bool, record: dict[str, Any] | None = None) -> None:
    """Make (or replace) a run directory and mark it as tuneoff's; `record` adds to the marker
    (compare: the launcher it started the arms with, None for one process each)."""
    if replace:
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # read-only or pseudo file systems, permissions
        raise UsageError(
            f"--output-dir {path}: cannot be created ({err.strerror}); choose a writable place"
        ) from None
    marker = path / MARKER
    stamp = json.loads(marker.read_text()) if marker.is_file() else {}
    stamp.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    marker.write_text(json.dumps({**stamp, **(record or {})}) + "\n")


def reproduce_command(run_dir: Path) -> str:
    """The command that reruns `run_dir`'s comparison as a new run (under its launcher)."""
    marker = run_dir / MARKER
    launcher = json.loads(marker.read_text()).get("launcher") if marker.is_file() else None
    command = f"tuneoff compare --config {run_dir / 'config.yaml'} --name NEW_NAME"
    return command + (f" --launcher {shlex.quote(launcher)}" if launcher else "")


def load_run_config(path: Path) -> tuple[Path, Config]:
    """The run directory of `path` (a run or one of its arm directories) and the config its
    splits are tokenized with."""
    run_dir = path if (path / "splits").is_dir() else path.parent
    # the arm's own config, else the run's (compare), else an arm's (a run made by `train`)
    candidates = [path / "config.yaml", run_dir / "config.yaml"]
    candidates += sorted(run_dir.glob("*/config.yaml"))
    cfg_path = next((c for c in candidates if c.is_file()), path / "config.yaml")
    if not (run_dir / "splits").is_dir() or not cfg_path.is_file():
        raise UsageError(f"{path}: not a tuneoff run or arm directory (no splits/ or config.yaml)")
    return run_dir, Config(**yaml.safe_load(cfg_path.read_text()))


# --------------------------------------------------------------------------- config from args


def resolve_args(args: argparse.Namespace) -> tuple[Config, dict, str]:
    """The config of `tuneoff compare` or `train` from its options, the per-arm overrides
    (`full.lr=2e-5`) and the preset's name ("custom" for a --config alone)."""
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise UsageError("--resume continues a run, --overwrite replaces it: pass one of them")
    overrides = parse_overrides(args.overrides)
    keys = ("model", "dataset", "name", "output_dir", "max_steps", "limit", "method")
    for key in (*keys, "memory_budget"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "methods", None) is not None:  # "" is an error, not the default arms
        overrides["methods"] = args.methods
    preset = args.preset or (None if args.config else "tiny")
    cfg, per_arm = resolve(preset, args.config, overrides)
    arms = {cfg.method} if args.command == "train" else {"base", *cfg.methods}
    # One arm trained from a run's config.yaml (as compare starts them) takes its own per-arm
    # keys from the file and leaves the other arms'; on the command line they must apply.
    named = {k.split(".", 1)[0] for k in overrides if "." in k}
    unknown_arms = (named if args.command == "train" else set(per_arm)) - arms
    if unknown_arms:
        raise ConfigError(
            f"per-arm override for {sorted(unknown_arms)}, which is not an arm here "
            f"({', '.join(sorted(arms))})"
        )
    if cfg.name is None:
        cfg = cfg.replace(
            name=f"{preset or Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    return cfg, per_arm, preset or "custom"


# --------------------------------------------------------------------------- compare


def launcher_command(launcher: str | None) -> list[str] | None:
    """The command that starts each arm of `compare` before `-m tuneoff train ...`: `launcher`
    split as a shell would (e.g. `accelerate launch --num_processes 8`); None: this Python."""
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError(
            "compare starts each arm in its own processes: run it without a launcher, and pass "
            "the launcher as --launcher 'accelerate launch ...' (or 'torchrun ...')"
        )
    if launcher is None:
        return None
    try:
        words = shlex.split(launcher)
    except ValueError as err:
        raise UsageError(f"--launcher {launcher!r}: {err}") from None
    if not words or shutil.which(words[0]) is None:
        what = f"{words[0]} not found on PATH" if words else "no command"
        raise UsageError(
            f"--launcher {launcher!r}: {what}; pass a command such as "
            "'accelerate launch --num_processes 8'"
        )
    return words


def compare(
    cfg: Config,
    per_arm: dict,
    preset: str,
    run_dir: Path,
    overwrite: bool,
    resume: bool,
    launcher: list[str] | None = None,
) -> None:
    """Every arm (base, then `cfg.methods`) in its own process (or processes, under `launcher`)
    on one split, then the deployment figures; the caller writes the report."""
    from tuneoff.config import write_yaml
    from tuneoff.data import prepare_splits
    from tuneoff.model import check_model

    check_model(cfg.model, cfg.max_seq_len)
    replace = check_dir(run_dir, overwrite, resume)
    records = load_unless_split(cfg, run_dir, resume)  # bad data fails before any write
    claim_dir(run_dir, replace, {"launcher": shlex.join(launcher) if launcher else None})
    # Saved without output_dir, so that rerunning it with another --name makes a new run; with
    # the per-arm overrides (`full.lr: 2.0e-05`), which each arm's process reads from it.
    header = f"# {reproduce_command(run_dir)}\n"
    write_yaml(cfg.replace(output_dir=None), run_dir / "config.yaml", header, per_arm)
    cfg = cfg.replace(output_dir=str(run_dir))
    prepare_splits(cfg, run_dir / "splits", records)
    log.info("tuneoff compare: %s preset, arms base + %s -> %s", preset, ", ".join(cfg.methods),
             run_dir)  # fmt: skip
    for method in ["base", *cfg.methods]:
        _run_arm_process(method, run_dir, resume, launcher)
    _measure_deployment(run_dir)


def _measure_deployment(run_dir: Path) -> None:
    """deployment.json for the report when a LoRA-type arm finished; a failure here is one
    line on stderr and never loses the comparison."""
    import torch

    from tuneoff.merge import measure_deployment
    from tuneoff.model import ModelError

    try:
        if measure_deployment(run_dir):
            log.info("\ndeployment figures: %s", run_dir / "deployment.json")
    except (ModelError, ConfigError, OSError, torch.OutOfMemoryError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        log.warning("tuneoff: deployment figures skipped: %s", first)


def load_unless_split(cfg: Config, run_dir: Path, resume: bool) -> list[dict] | None:
    from tuneoff.data import load_records

    if resume and (run_dir / "splits" / "manifest.json").is_file():
        return None
    return load_records(cfg.dataset, cfg.dataset_split, cfg.dataset_config)


def _run_arm_process(method: str, run_dir: Path, resume: bool, launcher: list[str] | None) -> None:
    """One arm as `tuneoff train` on the run's config.yaml (its per-arm keys included)."""
    summary_path = run_dir / method / "summary.json"
    if resume and summary_path.is_file() and json.loads(summary_path.read_text())["status"] == "ok":
        log.info("\n== %s: already done, skipped (--resume)", method)
        return
    log.info("\n== %s", method)
    cmd = [*(launcher or [sys.executable]), "-m", "tuneoff", "train", "--method", method,
           "--config", str(run_dir / "config.yaml"), "--output-dir", str(run_dir),
           "--no-report"]  # fmt: skip
    cmd += ["--resume"] if resume else []
    started = time.perf_counter()
    code = subprocess.run(cmd).returncode
    if not summary_path.is_file():
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        error = f"arm process exited with code {code}; see its output above"
        if code == 0:  # e.g. a --launcher that ran something else
            error = f"arm process exited 0 without writing its summary: check {' '.join(cmd)}"
        failed = {
            "status": "failed",
            "method": method,
            "exit_code": code,
            "error": error,
            "total_time_s": time.perf_counter() - started,
        }
        summary_path.write_text(json.dumps(failed, indent=2) + "\n")


# --------------------------------------------------------------------------- one arm


def train_arm(cfg: Config, overwrite: bool, resume: bool) -> tuple[Path, dict[str, Any] | None]:
    """One arm in this process (or in each process of `accelerate launch` / torchrun), into a
    new run or an existing one (another arm of it): the run directory and the arm's summary
    (None on a process other than the main one)."""
    from tuneoff.arm import run_arm
    from tuneoff.data import DataError, check_splits, prepare_splits
    from tuneoff.model import ModelError, check_model

    check_launch(cfg)
    dist = _launched_processes(cfg)
    if dist is not None:  # every process must use rank 0's run name (it holds a timestamp)
        from accelerate.utils import broadcast_object_list

        cfg = cfg.replace(name=broadcast_object_list([cfg.name])[0])
    run_dir = run_dir_of(cfg)
    arm_dir = run_dir / cfg.method
    check_model(cfg.model, cfg.max_seq_len)
    new_run = not (run_dir / MARKER).is_file()
    replace = check_dir(run_dir, overwrite, resume) if new_run else False
    if not new_run and arm_dir.exists() and not resume and not overwrite:
        raise UsageError(
            f"{arm_dir} already exists: pass --overwrite to replace this arm or "
            "--resume to continue it"
        )
    has_splits = check_splits(cfg, run_dir / "splits")  # before --overwrite deletes the arm
    records = None if has_splits else load_unless_split(cfg, run_dir, False)
    if dist is not None:
        dist.wait_for_everyone()  # every process checked before the main one writes
    if dist is None or dist.is_main_process:
        claim_dir(run_dir, replace)
        if not new_run and arm_dir.exists() and not resume:
            shutil.rmtree(arm_dir)  # --overwrite of this arm only
        prepare_splits(cfg, run_dir / "splits", records)
    if dist is not None:
        dist.wait_for_everyone()
    try:
        summary = run_arm(cfg.replace(output_dir=str(run_dir)), run_dir, resume=resume)
    except (ConfigError, DataError, ModelError) as err:  # the report shows the arm as failed
        summary_path = arm_dir / "summary.json"
        if (dist is None or dist.is_main_process) and not _finished(summary_path):
            # (a finished arm's summary stays: a failed --resume of it loses nothing)
            arm_dir.mkdir(parents=True, exist_ok=True)
            failed = {"status": "failed", "method": cfg.method, "error": str(err)}
            summary_path.write_text(json.dumps(failed, indent=2) + "\n")
        raise
    if dist is not None:
        dist.wait_for_everyone()
        if not dist.is_main_process:
            return run_dir, None
    return run_dir, summary


def _finished(summary_path: Path) -> bool:
    try:
        return json.loads(summary_path.read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def check_launch(cfg: Config) -> None:
    """Under `accelerate launch`: DDP, FSDP2 and DeepSpeed ZeRO stages 1 to 3 are supported
    (saving and resuming gather FSDP2's shards and ZeRO's master weights; tested on CPU); other
    launches are refused before anything is written. Reads the environment `accelerate launch`
    sets, as Accelerate itself does."""

    def on(name: str) -> bool:
        return os.environ.get(name, "false").lower() == "true"

    if on("ACCELERATE_USE_DEEPSPEED"):
        _check_deepspeed(cfg)
    version = os.environ.get("FSDP_VERSION", "1")  # Accelerate's default
    if on("ACCELERATE_USE_FSDP") and version != "2":
        raise UsageError(
            f"FSDP version {version} is not supported: launch with accelerate launch --use_fsdp "
            "--fsdp_version 2 (FSDP2)"
        )
    if on("ACCELERATE_USE_FSDP") and cfg.optimizer == "adamw8bit":
        raise UsageError(
            "optimizer=adamw8bit does not run under FSDP (bitsandbytes' kernel takes no sharded "
            "tensors): use optimizer=adamw or optimizer=adamw_lean"
        )


def _check_deepspeed(cfg: Config) -> None:
    """ZeRO stage 1, 2 or 3 (not for qlora) without offload, with torch's AdamW."""
    try:
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the launch's environment and config file
    except ImportError as err:
        raise UsageError(f"DeepSpeed launch, but {err}: pip install deepspeed") from None
    except (OSError, ValueError) as err:
        where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        raise UsageError(f"the DeepSpeed config {where}: {str(err).splitlines()[0]}") from None
    except (AttributeError, TypeError):  # Accelerate reads it as a dict
        where = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "")
        raise UsageError(f"the DeepSpeed config {where}: not a JSON object ({{...}})") from None
    for key in ("optimizer", "scheduler"):
        if key in plugin.deepspeed_config:
            raise UsageError(
                f"the DeepSpeed config has a {key!r} section: remove it (tuneoff's config sets "
                "the optimizer and its schedule: optimizer, lr, warmup_steps, lr_schedule)"
            )
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2, 3):
        raise UsageError(
            f"DeepSpeed ZeRO stage {stage} is not supported: launch with --zero_stage 1, 2 or 3"
        )
    if stage == 3 and cfg.method == "qlora":
        raise UsageError(
            "qlora under DeepSpeed ZeRO stage 3: its 4-bit weights cannot be partitioned; "
            "launch with --zero_stage 2, or with FSDP2"
        )
    for part in ("offload_optimizer", "offload_param"):
        device = (zero.get(part) or {}).get("device", "none")
        if device not in ("none", None):
            raise UsageError(
                f"DeepSpeed {part} to {device} is not supported: launch without offload "
                "(--offload_optimizer_device none --offload_param_device none)"
            )
    if cfg.optimizer != "adamw":
        raise UsageError(
            f"optimizer={cfg.optimizer} does not run under DeepSpeed (ZeRO hands the optimizer "
            "flat fp32 partitions, and keeps fp32 masters anyway): use optimizer=adamw"
        )


def _launched_processes(cfg: Config):
    """Accelerate's process state under `accelerate launch` / torchrun with more than one
    process (None otherwise): rank 0 prepares the run directory, every rank trains."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    from tuneoff.model import choose_runtime

    return PartialState(cpu=choose_runtime(cfg).device == "cpu")  # CPU: gloo processes
