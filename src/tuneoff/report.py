"""Reports read results, never the other way round: every table and plot here is built from the
`<arm>/summary.json` and `<arm>/metrics.jsonl` files of a run directory."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tuneoff.runs import UsageError, reproduce_command

log = logging.getLogger(__name__)

ARM_ORDER = ("base", "lora", "qlora", "full")
EXPECTED_DIFFERENCES = ("config.method",)  # differs between arms by design
# Where the results go and which arms a command ran: they never change what an arm trains, and
# an arm added later with `tuneoff train` differs in them from the arms `compare` ran.
BOOKKEEPING = ("config.name", "config.methods", "config.output_dir")
METRIC_HELP = """\
- **Loss**: mean cross-entropy (nats) over supervised tokens: response tokens and their EOS,
  predicted from the previous position. Prompt and padding tokens are never counted.
- **Perplexity**: exp(loss).
- **Token accuracy**: share of supervised tokens where the argmax of the logits at position t
  equals the label at t + 1.
- **Bits per token**: loss / ln 2.
- **Eval tokens/s**: non-padding tokens per second of evaluation forward passes only, after
  one untimed pass per model and process (generation is timed apart).
- **Exact match**: share of greedy generations on held-out test prompts equal to the reference
  answer (whitespace stripped). Meaningful for the embedded tasks, near zero for free text.
- **Peak memory**: CUDA: max reserved (allocated) by PyTorch's allocator during training;
  CPU: the peak resident set size of the arm's process.
- **Time per epoch**: training steps only (data collation, forward, backward, optimizer);
  evaluation, checkpoints and start-up are excluded.
- **Train tokens/s**: non-padding (supervised) tokens per second of training time.
"""


def read_json_object(path: Path, fix: str) -> dict[str, Any]:
    """A JSON file that must hold an object; anything else is a one-line UsageError saying `fix`."""
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, not a JSON object: {fix}")
    return data


def _rerun_arm(run_dir: Path, arm: str) -> str:
    config = run_dir / "config.yaml"  # a compare run's; rerunning an arm with it keeps the recipe
    with_config = f" --config {config}" if config.is_file() else ""
    return f"tuneoff train --method {arm} --output-dir {run_dir}{with_config} --overwrite"


def load_summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for path in run_dir.glob("*/summary.json"):
        arm = path.parent.name
        found[arm] = read_json_object(path, f"rerun that arm: {_rerun_arm(run_dir, arm)}")
    order = {name: i for i, name in enumerate(ARM_ORDER)}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], 99)))


def load_metrics(arm_dir: Path) -> list[dict[str, Any]]:
    path = arm_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a killed run leaves its last line half-written
                log.warning("%s line %d is truncated; plotting the lines before it", path, number)
                break
            row = None
        if not isinstance(row, dict) or not {"event", "step", "loss"} <= set(row):
            raise UsageError(
                f"{path} line {number} is not a metrics row (a JSON object with event, step and "
                "loss): delete that line or rerun the arm: "
                + _rerun_arm(arm_dir.parent, arm_dir.name)
            )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- formatting


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int) or (isinstance(value, float) and abs(value) >= 1000):
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _get(summary: dict, *path: str) -> Any:
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return None
        summary = summary[key]
    return summary


def _memory(summary: dict) -> str:
    mem = summary.get("memory") or {}
    if "peak_reserved_gib" in mem:
        return f"{mem['peak_reserved_gib']:.2f} GiB ({mem['peak_allocated_gib']:.2f} allocated)"
    if "peak_rss_gib" in mem:
        return f"{mem['peak_rss_gib']:.2f} GiB (CPU RSS)"
    return "–"


def _predicted(summary: dict) -> str:
    """The planner's prediction beside the measured peak: on CUDA the same quantities; on CPU
    the prediction counts tensors only, the RSS everything in the process."""
    plan = summary.get("memory_plan") or {}
    pred = plan.get("predicted")
    if not pred:
        return f"– ({plan['error']})" if plan.get("error") else "–"
    text = f"{pred['peak_reserved_gib']:.2f} GiB ({pred['peak_allocated_gib']:.2f} allocated)"
    measured = (summary.get("memory") or {}).get("peak_allocated_gib")
    if measured:
        text += f"; measured / predicted {measured / pred['peak_allocated_gib']:.2f}"
    elif (summary.get("memory") or {}).get("peak_rss_gib"):
        text = f"{pred['peak_allocated_gib']:.3f} GiB of tensors"
    advice = summary.get("advice") or {}
    if summary.get("status") == "oom" and advice.get("overrides"):
        text += f"; fits with: {advice['overrides']}"
    return text


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _status(summary: dict) -> str:
    status = summary.get("status", "?")
    return status if status == "ok" else f"**{status}**: {summary.get('error', '')}".strip()


def resources_rows(summaries: dict[str, dict]) -> list[list[str]]:
    arms = [s for name, s in summaries.items() if name != "base"]

    def row(label: str, fn) -> list[str]:
        return [label] + [fn(s) for s in arms]

    def params(s: dict) -> str:
        p = s.get("params")
        return f"{p['trainable_pct']:.3f}% ({p['trainable']:,} of {p['total']:,})" if p else "–"

    def tok_s(s: dict) -> str:
        t = s.get("training") or {}
        return (
            f"{_num(t.get('train_supervised_tokens_per_s'))} ({_num(t.get('train_tokens_per_s'))})"
        )

    def processes(s: dict) -> str:
        runtime = s.get("runtime") or {}
        n = runtime.get("world_size", 1)
        return f"{n} ({runtime.get('distributed', '?')}; memory is one process's)" if n > 1 else "1"

    several = any((s.get("runtime") or {}).get("world_size", 1) > 1 for s in arms)
    return [
        row("Status", _status),
        *([row("Processes", processes)] if several else []),
        row("Peak memory", _memory),
        row("Predicted peak (planner)", _predicted),
        row("Time per epoch", _epoch_time),
        row("Training duration", lambda s: _duration(_get(s, "training", "train_time_s"))),
        row("Arm wall time (with eval)", lambda s: _duration(s.get("total_time_s"))),
        row("Parameters trained", params),
        row("Train tokens/s: supervised (all)", tok_s),
        row("Padding share of batches", lambda s: _pct(_get(s, "training", "padding_fraction"))),
        row("Optimizer steps (epochs)", lambda s: _steps(s.get("training") or {})),
    ]


def _epoch_time(summary: dict) -> str:
    t = summary.get("training") or {}
    text = _duration(t.get("time_per_epoch_s"))
    epochs = t.get("epochs_completed") or 0
    return f"{text} (extrapolated from {epochs:.2f} epochs)" if 0 < epochs < 1 else text


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _steps(t: dict) -> str:
    if not t:
        return "–"
    per_step = f", {t['examples_per_step']:,} examples each" if "examples_per_step" in t else ""
    return f"{t['optimizer_steps']:,} ({t['epochs_completed']:.2f}){per_step}"


def results_rows(summaries: dict[str, dict], split: str) -> list[list[str]]:
    metrics = [
        ("Loss", "loss"),
        ("Perplexity", "perplexity"),
        ("Token accuracy", "token_accuracy"),
        ("Bits per token", "bits_per_token"),
        ("Eval tokens/s", "tokens_per_s"),
    ]
    return [
        [label] + [_num(_get(s, "metrics", split, key)) for s in summaries.values()]
        for label, key in metrics
    ]


def generation_rows(summaries: dict[str, dict]) -> list[list[str]]:
    def em(s: dict) -> str:
        g = s.get("generation") or {}
        return f"{100 * g['exact_match']:.1f}% of {g['examples']}" if "exact_match" in g else "–"

    return [
        ["Exact match (test)"] + [em(s) for s in summaries.values()],
        ["Generation tokens/s"]
        + [_num(_get(s, "generation", "generation_tokens_per_s")) for s in summaries.values()],
    ]


# --------------------------------------------------------------------------- confounds


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value


def confounds(summaries: dict[str, dict]) -> list[tuple[str, dict[str, Any], bool]]:
    """Every setting that differs between arms: config, runtime, versions, data.
    Returns (key, value per arm, expected) with expected True for method-specific keys."""
    flat = {}
    for name, s in summaries.items():
        if s.get("status") == "failed" and "config" not in s:
            continue
        out: dict[str, Any] = {}
        for section in ("config", "runtime", "versions", "data"):
            _flatten(section, s.get(section, {}), out)
        out["git_sha"] = s.get("git_sha")
        flat[name] = out
    keys = sorted({k for f in flat.values() for k in f} - set(BOOKKEEPING))
    rows = []
    for key in keys:
        values = {name: f.get(key) for name, f in flat.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            rows.append((key, values, key in EXPECTED_DIFFERENCES))
    return rows


def confound_section(summaries: dict[str, dict]) -> str:
    trained = {k: v for k, v in summaries.items() if k != "base"}
    rows = confounds(trained)
    unexpected = [r for r in rows if not r[2]]
    lines = [
        f"Settings compared across the trained arms ({', '.join(trained)}): config, runtime, "
        "package versions, git commit and data split hashes."
    ]
    if not unexpected:
        lines.append(
            "\nNo confounds: the arms differ only in "
            + (", ".join(f"`{k}`" for k, _, _ in rows) or "nothing")
            + "."
        )
    for key, values, expected in rows:
        tag = "expected (method)" if expected else "**CONFOUND**"
        shown = ", ".join(f"{arm}={json.dumps(v)}" for arm, v in values.items())
        lines.append(f"- `{key}`: {shown} — {tag}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- outputs


def write_loss_curves(run_dir: Path, summaries: dict[str, dict]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for i, name in enumerate(n for n in summaries if n != "base"):
        rows = load_metrics(run_dir / name)
        train = [(r["step"], r["loss"]) for r in rows if r["event"] == "train"]
        val = [(r["step"], r["loss"]) for r in rows if r["event"] == "eval"]
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.35, lw=1, label=f"{name} train")
            drawn = True
        if val:
            ax.plot(*zip(*val), color=color, marker="o", lw=2, label=f"{name} val")
    base_val = _get(summaries.get("base", {}), "metrics", "val", "loss")
    if base_val is not None:
        ax.axhline(base_val, color="gray", ls="--", lw=1, label="base model val")
    if not drawn and base_val is None:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_title(f"{run_dir.name}: train and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "loss_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def terminal_table(summaries: dict[str, dict]) -> str:
    """The comparison at a glance, for the end of `tuneoff compare`."""
    names = list(summaries)
    rows = [
        ["status"] + [summaries[n].get("status", "?") for n in names],
        ["peak memory GiB"] + [_num(_peak(summaries[n]), 2) for n in names],
        ["time/epoch"]
        + [_duration(_get(summaries[n], "training", "time_per_epoch_s")) for n in names],
        ["trained %"] + [_num(_get(summaries[n], "params", "trainable_pct")) for n in names],
        ["train sup tok/s"]
        + [_num(_get(summaries[n], "training", "train_supervised_tokens_per_s")) for n in names],
    ]
    for split in ("val", "test"):
        rows.append(
            [f"{split} loss"] + [_num(_get(summaries[n], "metrics", split, "loss")) for n in names]
        )
        rows.append(
            [f"{split} token acc"]
            + [_num(_get(summaries[n], "metrics", split, "token_accuracy")) for n in names]
        )
    rows.append(
        ["exact match"] + [_num(_get(summaries[n], "generation", "exact_match")) for n in names]
    )
    widths = [max(len(str(r[i])) for r in rows + [["", *names]]) for i in range(len(names) + 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(["", *names], widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _peak(summary: dict) -> float | None:
    mem = summary.get("memory") or {}
    return mem.get("peak_reserved_gib", mem.get("peak_rss_gib"))


def write_report(run_dir: Path) -> tuple[Path, str]:
    summaries = load_summaries(run_dir)
    if not summaries:
        raise UsageError(
            f"{run_dir}: no <arm>/summary.json found; is this a tuneoff run directory?"
        )
    plot = write_loss_curves(run_dir, summaries)
    any_arm = next(iter(s for s in summaries.values() if "config" in s), {})
    cfg = any_arm.get("config", {})
    runtime = any_arm.get("runtime", {})
    parts = [
        f"# tuneoff: {run_dir.name}",
        f"Model `{cfg.get('model')}` on `{cfg.get('dataset')}`; {runtime.get('device_name', '?')} "
        f"({runtime.get('device', '?')}), precision {runtime.get('precision', '?')}. "
        f"Reproduce: `{reproduce_command(run_dir)}`.",
        "## Training time & resources",
        _table(["Metric", *[n for n in summaries if n != "base"]], resources_rows(summaries)),
    ]
    for split, title in (("train", "Training (sample)"), ("val", "Validation"), ("test", "Test")):
        parts += [
            f"## Results: {title}",
            _table(["Metric", *summaries], results_rows(summaries, split)),
        ]
    parts += [
        "## Generation (held-out test prompts)",
        _table(["Metric", *summaries], generation_rows(summaries)),
    ]
    deployment = deployment_section(run_dir)
    if deployment:
        parts += ["## Deployment", deployment]
    missing = [
        arm for arm in ARM_ORDER if (run_dir / arm).is_dir() and arm not in summaries
    ]  # an arm still running, or stopped before it wrote its summary
    if missing:
        log.warning("report leaves out %s: no summary.json", ", ".join(missing))
        parts += [
            "## Not in this report",
            "\n".join(f"- {arm}: no summary.json (still running, or stopped before it "
                       f"finished); rerun it: `{_rerun_arm(run_dir, arm)}`" for arm in missing),
        ]  # fmt: skip
    parts += ["## Data", data_section(any_arm)]
    parts += ["## Confounds", confound_section(summaries)]
    if plot:
        parts += ["## Loss curves", f"![loss curves]({plot.name})"]
    parts += ["## What the metrics mean", METRIC_HELP]
    path = run_dir / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path, terminal_table(summaries)


def data_section(summary: dict) -> str:
    splits = _get(summary, "data", "splits") or {}
    rows = [
        [
            name,
            _num(c["examples"]),
            _num(c["truncated"]),
            _num(c["dropped"]),
            (_get(summary, "data", "split_sha256", name) or "")[:12],
        ]
        for name, c in splits.items()
    ]
    note = (
        "Truncated: response cut at max_seq_len (its EOS lost). Dropped: the prompt left no "
        "room for a response token. The train-split metrics use a fixed sample."
    )
    return _table(["Split", "Examples", "Truncated", "Dropped", "sha256"], rows) + "\n\n" + note


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _memory_of(n: str):
    def cell(arm: dict) -> str:
        memory = arm["memory_bytes"][n]
        return f"{_bytes(memory['one_base_n_adapters'])} / {_bytes(memory['n_merged'])}"

    return cell


def deployment_section(run_dir: Path) -> str | None:
    """Adapter vs model size, memory of N fine-tunes served as adapters on one base vs as N
    merged models, and adapter switch latency, from `deployment.json` (`tuneoff compare`)."""
    path = run_dir / "deployment.json"
    if not path.is_file():
        return None
    d = read_json_object(path, "delete it to rebuild the report without the Deployment section")
    arms, dtype = d["arms"], d["stored_dtype"]

    def row(label: str, fn) -> list[str]:
        return [label] + [fn(a) for a in arms.values()]

    def share(a: dict) -> str:
        return f"{_bytes(a['adapter_bytes'])} ({100 * a['adapter_share_of_base']:.2f}% of the base)"

    rows = [
        row("Adapter on disk (safetensors)", lambda a: _bytes(a["adapter_bytes_on_disk"])),
        row(f"Adapter weights ({dtype})", share),
        row(f"Base model weights ({dtype})", lambda a: _bytes(d["base_bytes"])),
    ]
    if "full_model_bytes_on_disk" in d:
        full = _bytes(d["full_model_bytes_on_disk"])
        rows.append(row("Full fine-tuned model on disk (full arm)", lambda a: full))
    for n in next(iter(arms.values()))["memory_bytes"]:
        rows.append(row(f"Serving {n}: one base + adapters / merged models", _memory_of(n)))
    s = d["switch"]
    note = (
        f"Memory is weights only, in the base's stored dtype. Adapter switch on {s['device']}: "
        f"set_adapter {s['set_adapter_ms']:.2f} ms; a forward pass of {s['prompt_tokens']} "
        f"tokens {s['forward_ms']:.2f} ms with the adapter active, "
        f"{s['switch_and_forward_ms']:.2f} ms right after a switch "
        f"({s['switch_overhead_ms']:+.2f} ms); medians of {s['repeats']}."
    )
    return _table(["Metric", *arms], rows) + "\n\n" + note
