"""`tuneoff bench`: tuneoff's training step against the reference recipe and TRL, on identical
work, each arm in its own process, without downloading a model.

Every arm builds the exact architecture with random weights (a shipped config, a local directory
or config.json, or a hub id) and trains on the same token id lists, written once by the parent:
examples tokenized from `--dataset`, or synthetic examples whose lengths follow alpaca-cleaned
(`synthetic_examples`). An optimizer step takes the next `batch_size x grad_accum` examples in
file order, so every arm and baseline updates on the same examples at every step.

The arms' processes, their timing and MFU: `bench_worker.py`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneoff.config import Config
from tuneoff.data import IGNORE, Example

log = logging.getLogger(__name__)

BASELINES = ("seed", "trl")
SEED_MICRO_BATCH = 4
# Alpaca-cleaned under the Qwen2.5 tokenizer and chat template, as estimated in issue 4 (no copy of
# the dataset was at hand to measure): total length log-normal with median 155 and mean 190 (so
# about 21% longer than 256; the other estimate, 30%, does not fit a log-normal with the
# same median and mean), of which the prompt is the chat template (~30 tokens) plus an instruction
# and optional input (log-normal, median 20).
ALPACA_MEDIAN, ALPACA_MEAN, TEMPLATE_TOKENS, PROMPT_MEDIAN = 155, 190, 30, 20


# --------------------------------------------------------------------------- examples


def synthetic_examples(n: int, seq_len: int, vocab: int, eos: int, seed: int) -> list[Example]:
    """Random token ids with alpaca-like lengths: prompt tokens unsupervised, the response and
    its EOS supervised, cut at `seq_len` from the end of the response as `data.tokenize` does."""
    rng = random.Random(seed)
    sigma = math.sqrt(2 * math.log(ALPACA_MEAN / ALPACA_MEDIAN))  # mean/median = exp(s^2 / 2)
    out = []
    for _ in range(n):
        total = max(8, round(rng.lognormvariate(math.log(ALPACA_MEDIAN), sigma)))
        prompt = min(TEMPLATE_TOKENS + round(rng.lognormvariate(math.log(PROMPT_MEDIAN), 0.8)),
                     seq_len - 1, total - 2)  # fmt: skip
        prompt = max(prompt, 1)
        ids = [rng.randrange(vocab) for _ in range(total - 1)] + [eos]
        labels = [IGNORE] * prompt + ids[prompt:]
        out.append(Example(ids[:seq_len], labels[:seq_len], total > seq_len))
    return out


def dataset_examples(source: str, tokenizer: Any, cfg: Config, n: int) -> list[Example]:
    """`n` examples tokenized exactly as training does, in a seeded order (repeated if short)."""
    from tuneoff.data import DataError, load_records, tokenize_split

    records = load_records(source, cfg.dataset_split, cfg.dataset_config)
    random.Random(cfg.seed).shuffle(records)
    examples, _ = tokenize_split(records[: n * 2], tokenizer, cfg)
    if not examples:
        raise DataError(f"dataset {source}: no example fits max_seq_len={cfg.max_seq_len}")
    if len(examples) < n:
        log.warning("dataset %s: %d examples, repeated to %d", source, len(examples), n)
    return [examples[i % len(examples)] for i in range(n)]


def build_examples(cfg: Config, dataset: str | None, n: int) -> tuple[list[Example], str]:
    """`n` examples from `dataset` (tokenized with the model's tokenizer) or synthetic ones."""
    if dataset:
        return dataset_examples(dataset, bench_tokenizer(cfg.model), cfg, n), dataset
    from tuneoff.model import load_arch_config

    config = load_arch_config(cfg.model)
    eos = config.eos_token_id
    eos = (eos[0] if isinstance(eos, list) else eos) or config.vocab_size - 1
    examples = synthetic_examples(n, cfg.max_seq_len, config.vocab_size, eos, cfg.seed)
    return examples, "synthetic (alpaca-like lengths)"


def bench_tokenizer(name: str) -> Any:
    """The model's tokenizer: the embedded one, Qwen2.5's without the hub for shipped Qwen
    configs, else from the local directory or the hub."""
    from tuneoff.model import EMBEDDED_MODEL, load_tokenizer, qwen_tokenizer, shipped_arch

    if name != EMBEDDED_MODEL and shipped_arch(name) and "qwen" in name.lower():
        return qwen_tokenizer()
    return load_tokenizer(name)


def length_stats(examples: list[Example]) -> dict[str, float]:
    lengths = sorted(len(e.input_ids) for e in examples)
    supervised = sum(supervised_count(e) for e in examples)
    return {
        "examples": len(examples),
        "mean_tokens": sum(lengths) / len(lengths),
        "median_tokens": lengths[len(lengths) // 2],
        "max_tokens": lengths[-1],
        "truncated_share": sum(e.truncated for e in examples) / len(examples),
        "supervised_share": supervised / sum(lengths),
    }


def supervised_count(e: Example) -> int:
    return sum(label != IGNORE for label in e.labels[1:])


def write_examples(examples: list[Example], path: Path) -> None:
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "truncated": e.truncated} for e in examples
    ]
    path.write_text(json.dumps(rows))


def read_examples(path: str | Path) -> list[Example]:
    return [
        Example(r["input_ids"], r["labels"], r["truncated"])
        for r in json.loads(Path(path).read_text())
    ]


# --------------------------------------------------------------------------- the parent


@dataclass
class BenchPlan:
    cfg: Config  # tuneoff's arms (before the method is set)
    methods: list[str]
    baselines: list[str]
    steps: int
    warmup_steps: int
    work_dir: Path
    repeats: int = 1


def seed_config(cfg: Config, device: str, batch_size: int | None) -> Config:
    """The reference recipe on the same examples per optimizer step."""
    per_step = cfg.batch_size * cfg.grad_accum
    micro = batch_size or SEED_MICRO_BATCH
    if per_step % micro:
        micro = cfg.batch_size  # keep the step's examples identical
    return cfg.replace(
        method="lora",
        batch_size=micro,
        grad_accum=per_step // micro,
        batching="padded",
        micro_batch_tokens=0,
        group_by_length=False,
        loss_chunk_size=0,
        weights_dtype="fp32",
        fused_optimizer=False,
        optimizer="adamw",
        gradient_checkpointing=False,
        compile=False,
        fast_dropout=False,
        lean_activations=False,
        precision="fp16" if device == "cuda" else "fp32",
    )


def arm_config(cfg: Config, spec: str) -> Config:
    """A tuneoff arm from `--methods`: a method, optionally with its own keys for an ablation
    on the same batches, e.g. `lora:lean_activations=false:batching=longest`."""
    from tuneoff.config import TRAINING_METHODS, ConfigError, check_keys, parse_overrides

    method, *items = spec.split(":")
    if method not in TRAINING_METHODS:
        choices = ", ".join(TRAINING_METHODS)
        raise ConfigError(f"--methods {spec}: {method!r} is not one of {choices}")
    overrides = parse_overrides(items)
    check_keys(overrides, f"--methods {spec}")
    for key in overrides:
        if "." in key or key in ("method", "methods"):
            raise ConfigError(f"--methods {spec}: '{key}' cannot be set per arm; name the method")
    return cfg.replace(method=method, **overrides)


def arm_configs(
    plan: BenchPlan, device: str, batch_size: int | None
) -> list[tuple[str, str, Config]]:
    arms = [(m, "tuneoff", arm_config(plan.cfg, m)) for m in plan.methods]
    if "seed" in plan.baselines:
        arms.append(("seed", "seed", seed_config(plan.cfg, device, batch_size)))
    if "trl" in plan.baselines:
        arms.append(("trl", "trl", plan.cfg.replace(method="lora")))
    return arms


def run_bench(
    plan: BenchPlan, examples: list[Example], device: str, batch_size: int | None
) -> dict:
    """Write the examples once, run every arm in its own process, collect the results. With
    `plan.repeats` > 1 the arms run in interleaved rounds (a, b, c, a, b, c, ...), so that a
    slow spell of a shared machine hits every arm alike, and each arm reports its median run."""
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    data_path = plan.work_dir / "examples.json"
    write_examples(examples, data_path)
    arms = arm_configs(plan, device, batch_size)
    runs: dict[str, list[dict]] = {arm: [] for arm, _, _ in arms}
    for round_ in range(plan.repeats):
        for arm, kind, cfg in arms:
            tag = arm if plan.repeats == 1 else f"{arm}.{round_ + 1}"
            runs[arm].append(run_arm_process(plan, arm, kind, cfg, data_path, tag))
    results = [median_run(runs[arm]) for arm, _, _ in arms]
    rounds = [ratios([runs[arm][i] for arm, _, _ in arms]) for i in range(plan.repeats)]
    ok = {r["arm"] for r in results if r["status"] == "ok"}  # no ratio for a failed arm
    paired = {
        arm: {base: value for base, value in bases.items() if base in ok}
        for arm, bases in median_ratios(rounds).items()
        if arm in ok
    }
    return {"arms": results, "ratios": paired, "repeats": plan.repeats}


def run_arm_process(
    plan: BenchPlan, arm: str, kind: str, cfg: Config, data_path: Path, tag: str
) -> dict:
    spec = {
        "arm": arm,
        "kind": kind,
        "config": cfg.to_dict(),
        "examples": str(data_path),
        "steps": plan.steps,
        "warmup_steps": plan.warmup_steps,
        "work_dir": str(plan.work_dir / tag),
        "result": str(plan.work_dir / f"{tag}.json"),
    }
    spec_path = plan.work_dir / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    Path(spec["result"]).unlink(missing_ok=True)
    print(f"== {tag}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "tuneoff.bench_worker", "--worker", str(spec_path)]
    code = subprocess.run(cmd, stdout=sys.stderr).returncode  # stdout: the table or JSON
    if Path(spec["result"]).is_file():
        result = json.loads(Path(spec["result"]).read_text())
    else:
        reason = f"arm process exited with code {code}; see its output above"
        result = {"arm": arm, "kind": kind, "method": cfg.method, "status": "failed"}
        result["reason"] = reason
    result["process_s"] = time.perf_counter() - started
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median supervised tokens/s (the lower middle of an even count), with
    every run's figure beside it; the first failed run if any failed."""
    bad = [r for r in runs if r["status"] != "ok"]
    if bad or len(runs) == 1:
        return bad[0] if bad else runs[0]
    speeds = [r["supervised_tokens_per_s"] for r in runs]
    ranked = sorted(range(len(runs)), key=lambda i: speeds[i])
    return {**runs[ranked[(len(runs) - 1) // 2]], "runs_supervised_tokens_per_s": speeds}


def median_ratios(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Each ratio's median over the rounds: arms of one round ran back to back, so a paired
    ratio cancels the machine's slow spells better than a ratio of medians would."""
    out: dict[str, dict[str, float]] = {}
    pairs = sorted({(arm, base) for r in rounds for arm in r for base in r[arm]})
    for arm, base in pairs:  # over every round where both ran
        values = sorted(r[arm][base] for r in rounds if base in r.get(arm, {}))
        out.setdefault(arm, {})[base] = values[(len(values) - 1) // 2]
    return out


def ratios(results: list[dict]) -> dict[str, dict[str, float]]:
    """Supervised tokens/s of each tuneoff arm over each baseline's."""
    ok = {r["arm"]: r for r in results if r["status"] == "ok"}
    out: dict[str, dict[str, float]] = {}
    for r in results:
        if r["kind"] != "tuneoff" or r["arm"] not in ok:
            continue
        for base in BASELINES:
            if base in ok:
                speed = r["supervised_tokens_per_s"] / ok[base]["supervised_tokens_per_s"]
                out.setdefault(r["arm"], {})[base] = speed
    return out


def _speed(r: dict) -> str:
    runs = r.get("runs_supervised_tokens_per_s")
    spread = f" ({min(runs):,.0f}-{max(runs):,.0f})" if runs else ""
    return f"{r['supervised_tokens_per_s']:,.0f}{spread}"


def format_table(report: dict) -> str:
    rows = [
        (
            "arm",
            "status",
            "precision",
            "sup tok/s",
            "tok/s",
            "padding",
            "opt ms",
            "MFU",
            "peak GiB",
            "x seed",
            "x trl",
        )
    ]
    for r in report["arms"]:
        if r["status"] != "ok":
            rows.append((r["arm"], f"{r['status']}: {r.get('reason', '')}"[:60], *[""] * 9))
            continue
        mem = r["memory"]
        peak = (
            f"{mem['peak_allocated_gib']:.2f}/{mem['peak_reserved_gib']:.2f}"
            if "peak_reserved_gib" in mem
            else f"{mem.get('peak_rss_gib', float('nan')):.2f} rss"
        )
        if "peak_step_tensors_gib" in mem:
            peak += f" / {mem['peak_step_tensors_gib'] * 1024:.0f} MiB tensors"
        ratio = report["ratios"].get(r["arm"], {})
        rows.append(
            (
                r["arm"],
                "ok",
                r.get("precision", "-"),
                _speed(r),
                f"{r['tokens_per_s']:,.0f}",
                f"{r['padding_fraction']:.1%}",
                f"{r['optimizer_step_ms']:.1f}" if r.get("optimizer_step_ms") is not None else "-",
                f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
                peak,
                f"{ratio['seed']:.2f}x" if "seed" in ratio else "",
                f"{ratio['trl']:.2f}x" if "trl" in ratio else "",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def default_work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tuneoff-bench-"))


# --------------------------------------------------------------------------- `tuneoff bench`


def _bench_config(args: argparse.Namespace) -> Config:
    """Tuneoff's arms: the reference's hyperparameters (the config defaults) unless
    --preset/--config/key=value say otherwise, in bf16 where the GPU has it."""
    from tuneoff.config import parse_overrides, resolve
    from tuneoff.runs import UsageError

    overrides = parse_overrides(args.overrides)
    if "precision" not in overrides:
        overrides["precision"] = "auto"  # tuneoff's arms: bf16 where the GPU has it
    flags = {"model": args.model, "device": args.device, "batch_size": args.batch_size}
    if args.seq_len is not None and args.seq_len < 1:
        raise UsageError(f"--seq-len {args.seq_len}: must be >= 1")
    seq_len = args.seq_len or (None if args.config or "max_seq_len" in overrides else 256)
    flags.update({"grad_accum": args.grad_accum, "max_seq_len": seq_len})
    overrides.update({k: v for k, v in flags.items() if v is not None})
    cfg, per_arm = resolve(args.preset, args.config, overrides)
    if per_arm:
        raise UsageError(f"bench takes no per-arm overrides ({sorted(per_arm)})")
    return cfg


def prepare_bench(args: argparse.Namespace) -> tuple[BenchPlan, list[Example], str, str]:
    """`tuneoff bench`'s options, checked (a bad one is a one-line UsageError) and resolved:
    the plan, its examples, the device and where the examples come from. Without --work-dir
    the work directory is a new temporary one."""
    from tuneoff.model import choose_runtime
    from tuneoff.runs import UsageError, check_not_a_file

    cfg = _bench_config(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or len(set(methods)) != len(methods):
        raise UsageError(f"--methods {args.methods}: name each arm once, at least one")
    for spec in methods:
        arm_config(cfg, spec)  # validates the method and the arm's own keys
    baselines = [b.strip() for b in args.baselines.split(",") if b.strip() not in ("", "none")]
    if set(baselines) - set(BASELINES):
        raise UsageError(f"--baselines {args.baselines}: choose from {', '.join(BASELINES)}")
    if args.steps < 1 or args.warmup_steps < 0 or args.repeats < 1:
        raise UsageError("--steps and --repeats must be >= 1, --warmup-steps >= 0")
    if args.work_dir:
        check_not_a_file(Path(args.work_dir), "--work-dir")
        kept = Path(args.work_dir)
        if kept.is_dir() and any(kept.iterdir()) and not (kept / "examples.json").is_file():
            raise UsageError(
                f"--work-dir {kept} holds files that are not a bench's: choose an empty or new "
                "directory"
            )
    device = choose_runtime(cfg).device
    work_dir = Path(args.work_dir) if args.work_dir else default_work_dir()
    n = (args.steps + args.warmup_steps) * cfg.batch_size * cfg.grad_accum
    examples, source = build_examples(cfg, args.dataset, n)
    plan = BenchPlan(cfg, methods, baselines, args.steps, args.warmup_steps, work_dir, args.repeats)
    return plan, examples, device, source


def headline(plan: BenchPlan, examples: list[Example], device: str, source: str) -> str:
    """What is about to run, said before the arms start."""
    cfg, stats = plan.cfg, length_stats(examples)
    return (
        f"tuneoff bench: {cfg.model} ({device}), {', '.join(plan.methods + plan.baselines)}; "
        f"{source}: {plan.steps} steps of {cfg.batch_size} x {cfg.grad_accum} examples, mean "
        f"{stats['mean_tokens']:.0f} tokens, max_seq_len {cfg.max_seq_len}"
    )


def run_and_write(
    plan: BenchPlan,
    examples: list[Example],
    device: str,
    source: str,
    batch_size: int | None,
    temporary: bool,
) -> tuple[dict[str, Any], Path]:
    """Run the bench and write `bench.json` into its work directory; of a `temporary` one only
    bench.json is kept, and nothing of a failed bench."""
    try:
        report = run_bench(plan, examples, device, batch_size)
    except BaseException:
        if temporary:  # nothing of a failed bench is left in /tmp
            shutil.rmtree(plan.work_dir, ignore_errors=True)
        raise
    if temporary:  # a temporary directory keeps only bench.json
        shutil.rmtree(plan.work_dir)
        plan.work_dir.mkdir()
    stats = length_stats(examples)
    report = {
        "model": plan.cfg.model,
        "device": device,
        "data": {"source": source, **stats},
        **report,
    }
    path = plan.work_dir / "bench.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report, path
