"""The `tuneoff` command line. Thin: parse, resolve the config, call the library.

Heavy imports (torch, transformers) happen inside the commands so that `--help` is instant.
Errors a user can cause are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from tuneoff.config import METHODS, TRAINING_METHODS, ConfigError, preset_names
from tuneoff.runs import UsageError, launcher_command, resolve_args, run_dir_of


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        help=f"start from a preset: {', '.join(preset_names())} "
        "(default: tiny, unless --config is given)",
    )
    p.add_argument("--config", help="YAML file of config keys, applied over the preset")
    p.add_argument("--model", help="hub id or local directory (config key: model)")
    p.add_argument(
        "--dataset",
        help="hub id, local dataset directory or .json/.jsonl/.csv/.parquet file: "
        "instruction/input/output, "
        "instruction/context/response, prompt/completion, messages or conversations "
        "(key: dataset)",
    )
    p.add_argument("--name", help="run name; results go to runs/<name>/ (key: name)")
    p.add_argument("--output-dir", help="run directory (default runs/<name>)")
    p.add_argument("--max-steps", type=int, help="stop after N optimizer steps (smoke tests)")
    p.add_argument("--limit", type=int, help="use only the first N examples of the dataset")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing run (train: only this arm of it; the run's split stays)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--memory-budget",
        help="cap each arm's CUDA memory, e.g. 16GiB, to reproduce a smaller GPU; an arm that "
        "does not fit becomes an 'oom' row with the planner's advice (key: memory_budget)",
    )
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
    p.add_argument(
        "--launcher",
        help="run each arm's process under this command, e.g. 'accelerate launch "
        "--num_processes 8' or 'torchrun --nproc_per_node 8' (with --use_fsdp --fsdp_version 2 "
        "or --use_deepspeed --zero_stage 2 for Accelerate); default: one plain process per arm",
    )
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
    _add_deploy_parsers(sub)
    _add_bench_parser(sub)
    _add_plan_parser(sub)
    return parser


def _add_config_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"start from a preset: {', '.join(preset_names())}")
    p.add_argument("--config", help="YAML file of config keys, applied over the preset")


def _add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="predict each arm's peak GPU memory before running it, and what makes it fit",
        description="Trace each arm's training step on the meta device (no weights, no "
        "download) and predict its peak memory by component: weights, gradients, optimizer "
        "states, activations, logits and loss, autocast copies, evaluation. With --gpu-memory: "
        "fits or not, and the cheapest settings that make it fit. Planned for a GPU (bf16 "
        "autocast unless precision=fp16/fp32) unless device=cpu. Without --preset or --config: "
        "the seed preset (the reference's model and recipe, fp16 autocast).",
    )
    _add_config_source(p)
    p.add_argument(
        "--model",
        help="shipped config (qwen2.5-0.5b/1.5b/3b/7b, llama-3.2-1b/3b, with or without "
        "-instruct), hub id, local model directory or config.json",
    )
    p.add_argument("--methods", help=f"comma-separated, from {', '.join(TRAINING_METHODS)}")
    p.add_argument("--gpu-memory", help="the GPU's memory, e.g. 16GiB or 24GB (default: this GPU)")
    p.add_argument(
        "--processes",
        metavar="N",
        help="predict per process of a launch over N processes (default 1: one process holding "
        "the whole model); --gpu-memory and the advice are then per GPU",
    )
    p.add_argument(
        "--sharding",
        metavar="KIND",
        help="how the N processes share the model: ddp (default when N > 1), fsdp2, zero1, "
        "zero2 or zero3 (DeepSpeed, with its default bucket sizes)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="also run a few real steps with random weights of the architecture on this "
        "machine (CUDA if present, else CPU) and print predicted vs measured per component",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="training throughput of tuneoff vs the reference recipe and TRL",
        description="Train each method and baseline for a few steps, each in its own process, "
        "on identical batches of the exact architecture with random weights (no download), "
        "and print supervised tokens/s, tokens/s, padding, optimizer-step time, MFU and peak "
        "memory, with the ratios tuneoff / baseline. Hyperparameters: the reference's (the "
        "config defaults) unless --preset/--config/key=value say otherwise.",
    )
    _add_config_source(p)
    p.add_argument("--model", help="shipped config name (qwen2.5-1.5b), hub id or local path")
    p.add_argument(
        "--methods",
        default="lora,full",
        help="tuneoff arms (default lora,full); an arm may add its own keys for an ablation on "
        "the same batches: lora:lean_activations=false:batching=longest",
    )
    p.add_argument(
        "--baselines", default="seed,trl", help="from seed, trl; 'none' for none (default both)"
    )
    p.add_argument("--dataset", help="tokenize batches from this dataset (default: synthetic)")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps (10)")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (2)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run every arm this many times in interleaved rounds; report each arm's median "
        "run with the range, and each ratio as the median of the rounds' ratios (1; use 3+ on "
        "a shared or noisy machine)",
    )
    p.add_argument("--batch-size", type=int, help="micro-batch of every arm (seed: 4)")
    p.add_argument("--grad-accum", type=int, help="accumulation steps (config: grad_accum)")
    p.add_argument(
        "--seq-len", type=int, help="max tokens per example (256; with --config: its max_seq_len)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="config key: device")
    p.add_argument("--work-dir", help="where examples and per-arm results go (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides for tuneoff's arms, e.g. batching=longest loss_chunk_size=0",
    )


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model, verified",
        description="Merge an adapter into its base and write a safetensors model + tokenizer "
        "that plain transformers loads. Checked first: merged logits against base + adapter on "
        "held-out examples (fp32), no NaN/Inf; a QLoRA adapter merges onto the dequantized "
        "4-bit base.",
    )
    p.add_argument("source", help="adapter directory, or a lora/qlora arm dir (runs/<name>/lora)")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--model", help="base model (default: the arm's config / the adapter's)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="dtype of the written weights (default: the base's stored dtype)",
    )
    p.add_argument("--examples", type=int, default=4, help="held-out examples checked (4)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit diff| (1e-4)")
    p.add_argument(
        "--base-4bit",
        action="store_true",
        help="merge onto the dequantized 4-bit base (default: when the arm's method is qlora)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an earlier merge output")
    p = sub.add_parser(
        "generate",
        help="answer a prompt with the base model or base + adapter",
        description="Generate with the chat template applied, greedy unless --temperature > 0, "
        "streamed to the terminal.",
    )
    p.add_argument("prompt", help="the user message ('-': read it from stdin)")
    p.add_argument("--model", help="base model (default: the adapter's base)")
    p.add_argument("--adapter", help="adapter directory or lora/qlora arm dir")
    p.add_argument("--system", help="a system message before the prompt")
    p.add_argument("--raw", action="store_true", help="no chat template: the prompt as is")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k cut")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--no-stream", action="store_true", help="print the answer at the end")
    _add_device_options(p)
    p = sub.add_parser(
        "serve",
        help="OpenAI-compatible server: one base model, many adapters",
        description="Serve the base model and every adapter behind an OpenAI-compatible API "
        "(/v1/models, /v1/completions, /v1/chat/completions, /health); a request's `model` "
        "names the base or an adapter. Needs the serve extra: pip install 'tuneoff[serve]'. "
        "Runtime load/unload (POST /v1/adapters, DELETE /v1/adapters/NAME) exist only when "
        "the TUNEOFF_ADMIN_KEY environment variable is set.",
    )
    p.add_argument("--model", help="base model (default: the first adapter's base)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="serve an adapter under NAME (repeatable); PATH: adapter dir or arm dir",
    )
    p.add_argument("--adapters-dir", help="serve every adapter in this directory, by dir name")
    p.add_argument(
        "--base-name", help="the base model's name in requests (default: --model; a dir: its name)"
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-tokens-cap", type=int, default=512, help="max_tokens limit (512)")
    p.add_argument(
        "--max-prompt-tokens", type=int, help="prompt limit (default: the context length)"
    )
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit")
    _add_device_options(p)


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="weights dtype (auto: fp32 on CPU, bf16 on CUDA)",
    )


# --------------------------------------------------------------------------- commands


def cmd_compare(args: argparse.Namespace) -> int:
    from tuneoff.report import load_summaries, write_report
    from tuneoff.runs import compare

    cfg, per_arm, preset = resolve_args(args)
    launcher = launcher_command(args.launcher)
    run_dir = args.run_dir = run_dir_of(cfg)
    compare(cfg, per_arm, preset, run_dir, args.overwrite, args.resume, launcher)
    report_path, table = write_report(run_dir)
    print(table)
    print(f"\nreport: {report_path}")
    # An arm out of memory is a result (a row of the report); an arm that failed is not.
    failed = [arm for arm, s in load_summaries(run_dir).items() if s.get("status") == "failed"]
    if failed:
        print(f"tuneoff: arms failed: {', '.join(failed)} (see report and above)", file=sys.stderr)
    return 1 if failed else 0


def cmd_train(args: argparse.Namespace) -> int:
    from tuneoff.report import write_report
    from tuneoff.runs import train_arm

    cfg, per_arm, _ = resolve_args(args)
    cfg = cfg.replace(**per_arm.get(cfg.method, {}))
    args.run_dir = run_dir_of(cfg)
    run_dir, summary = train_arm(cfg, args.overwrite, args.resume)
    if summary is None:  # not the main process
        return 0
    if not args.no_report:
        report_path, table = write_report(run_dir)
        print(table)
        print(f"\nreport: {report_path}")
    return 0 if summary["status"] == "ok" else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    from tuneoff.data import inspect_examples

    if args.limit < 1:
        raise UsageError(f"--limit {args.limit}: show at least 1 example")
    print(inspect_examples(Path(args.run), args.split, args.limit, as_json=args.json))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tuneoff.report import write_report

    report_path, table = write_report(Path(args.run))
    print(table)
    print(f"\nreport: {report_path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from tuneoff.engine import choose_device
    from tuneoff.merge import check_merge_options, format_merge, merge_adapter

    out = check_merge_options(args.out, args.overwrite, args.examples, args.tolerance)
    device = choose_device(args.device)[0]
    print(f"tuneoff merge: {args.source} -> {out} (checking on {device})", flush=True)
    quantized = True if args.base_4bit else None  # None: as the arm's method says
    source = Path(args.source)
    r = merge_adapter(
        source, out, args.model, args.dtype, args.examples, args.tolerance, quantized, device
    )
    print(format_merge(r, out))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tuneoff.engine import (
        Engine,
        generation_model,
        generation_prompt_ids,
        generation_sampling,
        generation_text,
    )

    model, adapters = generation_model(args.model, args.adapter)
    prompt = generation_text(args.prompt, args.system)
    sampling = generation_sampling(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed
    )
    engine = Engine(model, adapters, device=args.device, dtype=args.dtype)
    ids = generation_prompt_ids(engine, prompt, args.system, args.raw)
    name = "adapter" if adapters else engine.base_name
    try:
        if args.no_stream:
            print(engine.complete(name, ids, sampling).text)
            return 0
        for delta in engine.generate(name, ids, sampling):
            print(delta.text, end="", flush=True)
    except KeyboardInterrupt:  # stop generating; there is nothing to resume
        print()
        return 130
    print()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401

        from tuneoff import serve
    except ModuleNotFoundError as err:
        if err.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise UsageError(f"tuneoff serve needs {err.name}: pip install 'tuneoff[serve]'") from None
    from tuneoff.adapters import model_name
    from tuneoff.engine import Engine

    model, adapters, root = serve.served_models(args.model, args.adapter, args.adapters_dir)
    base_name = args.base_name or (args.model and model_name(args.model))  # runs/x/full: full
    limits = serve.server_limits(
        args.max_tokens_cap, args.max_prompt_tokens, args.max_body_bytes, args.port
    )
    admin_key = os.environ.get("TUNEOFF_ADMIN_KEY") or None
    engine = Engine(model, adapters, args.device, args.dtype, base_name=base_name)
    print(serve.banner(engine, args.host, args.port, admin_key))
    serve.serve(engine, args.host, args.port, limits, admin_key, root)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tuneoff import bench

    plan, examples, device, source = bench.prepare_bench(args)
    print(bench.headline(plan, examples, device, source), file=sys.stderr)
    temporary = not args.work_dir
    report, path = bench.run_and_write(plan, examples, device, source, args.batch_size, temporary)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(bench.format_table(report))
        print(f"\nresults: {path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in report["arms"]) else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from tuneoff.measure import measure_arms
    from tuneoff.model import load_arch_config
    from tuneoff.plan import format_plan, gpu_memory_limit, plan_arms, plan_config
    from tuneoff.sharding import parse_sharding

    sharding = parse_sharding(args.processes, args.sharding)
    if sharding is not None and args.measure:
        raise UsageError("--measure runs one process: leave out --processes, or --measure")
    cfg = plan_config(args.preset, args.config, args.overrides, args.model, args.methods)
    limit = gpu_memory_limit(args.gpu_memory)
    arch = load_arch_config(cfg.model)
    result = plan_arms(cfg, cfg.methods, limit, arch, sharding)
    if args.measure:
        result["measured"] = measure_arms(cfg, cfg.methods, arch)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    # key=value overrides may follow options too (`train --max-steps 5 lr=1e-4`): argparse stops
    # collecting a positional list at the first option.
    late = [a for a in unknown if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        unknown = [a for a in unknown if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    # Under a launcher every process runs this: the others say only what goes wrong.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # bitsandbytes (imported by peft) warns on CPUs with bf16 about a kernel tuneoff never uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # Offline, the hub client logs every retry of every request (twice); tuneoff says it once.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    # Library chatter (weight-loading bars, deprecation notices) would bury tuneoff's own output.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Variable batch shapes fragment the CUDA cache (reserved was 2x allocated without this).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from tuneoff.checkpoint import CheckpointError
    from tuneoff.data import DataError
    from tuneoff.model import ModelError

    commands = {
        "compare": cmd_compare,
        "train": cmd_train,
        "inspect": cmd_inspect,
        "report": cmd_report,
        "merge": cmd_merge,
        "generate": cmd_generate,
        "serve": cmd_serve,
        "bench": cmd_bench,
        "plan": cmd_plan,
    }
    try:
        return commands[args.command](args)
    except (CheckpointError, ConfigError, DataError, ModelError, UsageError) as err:
        if os.environ.get("RANK", "0") == "0":  # under a launcher every process hits it
            print(f"tuneoff: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = f" --output-dir {args.run_dir}" if getattr(args, "run_dir", None) else ""
        hint = f"continue with the same command and{where} --resume"
        print(f"\ntuneoff: interrupted; {hint}", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
