"""The `tuneoff` command line. Thin: parse, resolve the config, call the library.

Heavy imports (torch, transformers) happen inside the commands so that `--help` is instant.
Errors a user can cause are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

from tuneoff.config import METHODS, TRAINING_METHODS, Config, ConfigError, preset_names

MARKER = "tuneoff-run.json"  # only directories holding it may be replaced by --overwrite


class UsageError(ValueError):
    """A user-caused problem found by the CLI itself."""


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help=f"start from a preset: {', '.join(preset_names())} "
        "(default: tiny, unless --config is given)",
    )
    p.add_argument("--config", help="YAML file of config keys, applied over the preset")
    p.add_argument("--model", help="hub id or local directory (config key: model)")
    p.add_argument("--dataset", help="hub id or .json/.jsonl/.csv/.parquet file (key: dataset)")
    p.add_argument("--name", help="run name; results go to runs/<name>/ (key: name)")
    p.add_argument("--output-dir", help="run directory (default runs/<name>)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke tests)")
    p.add_argument("--limit", type=int, help="use only the first N examples of the dataset")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. lr=1e-4 epochs=1; in compare, full.lr=2e-5 "
        "sets one arm only (and is listed as a confound)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneoff",
        description="Run LoRA and full fine-tuning side by side under one protocol, and measure.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "compare",
        help="run every arm (base, lora, full) and write a report",
        description="Evaluate the base model, train each method in its own "
        "process on identical data, and write runs/<name>/report.md.",
    )
    _add_run_options(p)
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(TRAINING_METHODS)}")
    p = sub.add_parser(
        "train",
        help="train (or evaluate) one arm",
        description="Train one arm into runs/<name>/<method>/. "
        "--method base only evaluates the untouched model.",
    )
    p.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    _add_run_options(p)
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)  # used by compare
    p = sub.add_parser(
        "inspect",
        help="show what the model sees, token by token",
        description="Tokenize examples of a run's split exactly as training "
        "does; tokens in [brackets] count toward the loss.",
    )
    p.add_argument("run", help="a run directory or one of its arm directories")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--limit", type=int, default=3, help="number of examples (default 3)")
    p.add_argument("--json", action="store_true", help="print input_ids and labels as JSON")
    p = sub.add_parser("report", help="rebuild report.md and loss_curves.png of a run")
    p.add_argument("run", help="run directory")
    return parser


# --------------------------------------------------------------------------- config from args


def resolve_args(args: argparse.Namespace) -> tuple[Config, dict, str]:
    from tuneoff.config import parse_overrides, resolve

    overrides = parse_overrides(args.overrides)
    for key in ("model", "dataset", "name", "output_dir", "max_steps", "limit", "method"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if getattr(args, "methods", None):
        overrides["methods"] = args.methods
    preset = args.preset or (None if args.config else "tiny")
    cfg, per_arm = resolve(preset, args.config, overrides)
    unknown_arms = set(per_arm) - set(cfg.methods) - {cfg.method}
    if unknown_arms:
        raise ConfigError(f"per-arm override for {sorted(unknown_arms)}, which is not an arm here")
    if cfg.name is None:
        cfg = cfg.replace(
            name=f"{preset or Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
    return cfg, per_arm, preset or "custom"


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output_dir) if cfg.output_dir else Path("runs") / str(cfg.name)


def check_dir(path: Path, overwrite: bool, resume: bool) -> bool:
    """May `path` be used? True if it holds a run to replace (--overwrite). Raises otherwise.
    Only a tuneoff run may be replaced: nothing a user had is deleted or silently overwritten."""
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


def claim_dir(path: Path, replace: bool) -> None:
    if replace:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        stamp = json.dumps({"created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        (path / MARKER).write_text(stamp + "\n")


# --------------------------------------------------------------------------- commands


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneoff.config import write_yaml
    from tuneoff.data import prepare_splits
    from tuneoff.model import check_model
    from tuneoff.report import write_report

    cfg, per_arm, preset = resolve_args(args)
    run_dir = args.run_dir = run_dir_of(cfg)
    check_model(cfg.model)
    replace = check_dir(run_dir, args.overwrite, args.resume)
    records = _load_unless_split(cfg, run_dir, args.resume)  # bad data fails before any write
    claim_dir(run_dir, replace)
    cfg = cfg.replace(output_dir=str(run_dir))
    header = f"# tuneoff compare --config {run_dir / 'config.yaml'}\n"
    write_yaml(cfg, run_dir / "config.yaml", header=header)
    prepare_splits(cfg, run_dir / "splits", records)
    print(f"tuneoff compare: {preset} preset, arms base + {', '.join(cfg.methods)} -> {run_dir}")
    for method in ["base", *cfg.methods]:
        _run_arm_process(method, run_dir, per_arm.get(method, {}), args.resume)
    report_path, table = write_report(run_dir)
    print(table)
    print(f"\nreport: {report_path}")
    return 0


def _load_unless_split(cfg: Config, run_dir: Path, resume: bool) -> list[dict] | None:
    from tuneoff.data import load_records

    if resume and (run_dir / "splits" / "manifest.json").is_file():
        return None
    return load_records(cfg.dataset, cfg.dataset_split, cfg.dataset_config)


def _run_arm_process(method: str, run_dir: Path, overrides: dict, resume: bool) -> None:
    """Each arm in a fresh process, so its peak memory is its own and its failure (an OOM, a
    crash) becomes a row of the report instead of the end of the comparison."""
    summary_path = run_dir / method / "summary.json"
    if resume and summary_path.is_file() and json.loads(summary_path.read_text())["status"] == "ok":
        print(f"\n== {method}: already done, skipped (--resume)")
        return
    print(f"\n== {method}", flush=True)
    cmd = [
        sys.executable,
        "-m",
        "tuneoff",
        "train",
        "--method",
        method,
        "--config",
        str(run_dir / "config.yaml"),
        "--no-report",
    ]
    cmd += ["--resume"] if resume else []
    cmd += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    started = time.perf_counter()
    code = subprocess.run(cmd).returncode
    if code != 0 and not summary_path.is_file():
        summary_path.parent.mkdir(parents=True, exist_ok=True)
        failed = {
            "status": "failed",
            "method": method,
            "exit_code": code,
            "error": f"arm process exited with code {code}; see its output above",
            "total_time_s": time.perf_counter() - started,
        }
        summary_path.write_text(json.dumps(failed, indent=2) + "\n")


def cmd_train(args: argparse.Namespace) -> int:
    from tuneoff.data import DataError, prepare_splits
    from tuneoff.model import ModelError, check_model
    from tuneoff.report import write_report
    from tuneoff.train import run_arm

    cfg, per_arm, _ = resolve_args(args)
    cfg = cfg.replace(**per_arm.get(cfg.method, {}))
    run_dir = args.run_dir = run_dir_of(cfg)
    arm_dir = run_dir / cfg.method
    check_model(cfg.model)
    new_run = not (run_dir / MARKER).is_file()
    replace = check_dir(run_dir, args.overwrite, args.resume) if new_run else False
    if not new_run and arm_dir.exists() and not args.resume and not args.overwrite:
        raise UsageError(
            f"{arm_dir} already exists: pass --overwrite to replace this arm or "
            "--resume to continue it"
        )
    has_splits = (run_dir / "splits" / "manifest.json").is_file()
    records = None if has_splits else _load_unless_split(cfg, run_dir, False)
    claim_dir(run_dir, replace)
    if not new_run and arm_dir.exists() and not args.resume:
        shutil.rmtree(arm_dir)  # --overwrite of this arm only
    prepare_splits(cfg, run_dir / "splits", records)
    try:
        summary = run_arm(cfg.replace(output_dir=str(run_dir)), run_dir, resume=args.resume)
    except (ConfigError, DataError, ModelError) as err:  # the report shows the arm as failed
        arm_dir.mkdir(parents=True, exist_ok=True)
        failed = {"status": "failed", "method": cfg.method, "error": str(err)}
        (arm_dir / "summary.json").write_text(json.dumps(failed, indent=2) + "\n")
        raise
    if not args.no_report:
        report_path, table = write_report(run_dir)
        print(table)
        print(f"\nreport: {report_path}")
    return 0 if summary["status"] == "ok" else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from tuneoff.report import inspect_examples

    print(inspect_examples(Path(args.run), args.split, args.limit, as_json=args.json))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneoff.report import write_report

    report_path, table = write_report(Path(args.run))
    print(table)
    print(f"\nreport: {report_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    # Library chatter (weight-loading bars, deprecation notices) would bury tuneoff's own output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from tuneoff.data import DataError
    from tuneoff.model import ModelError

    commands = {
        "compare": cmd_compare,
        "train": cmd_train,
        "inspect": cmd_inspect,
        "report": cmd_report,
    }
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, ModelError, UsageError) as err:
        print(f"tuneoff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" --output-dir {args.run_dir}" if getattr(args, "run_dir", None) else ""
        hint = f"continue with the same command and{where} --resume"
        print(f"\ntuneoff: interrupted; {hint}", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
