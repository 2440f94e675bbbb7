"""Deployment: merge a LoRA adapter into its base model, verified, and the deployment figures of a
run (adapter vs model size, memory of N adapters on one base vs N merged models, switch latency).

A merge checks itself before anything is written: the logits of the merged model against the
base + adapter on held-out examples (max absolute difference, fp32), no NaN or Inf in any weight,
and after writing, the saved model read back with plain `transformers` gives the same logits.
A QLoRA adapter is merged onto the dequantized 4-bit base; its difference to the 4-bit base +
adapter and to the original full-precision base + adapter is reported.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from tuneoff.adapters import (
    arm_config,
    base_model_of,
    check_adapter,
    error_detail,
    find_adapter_dir,
)
from tuneoff.checkpoint import share_like_other_files
from tuneoff.engine import DTYPES
from tuneoff.model import ModelError, check_model, load_tokenizer, resolve_model_path
from tuneoff.runs import UsageError, check_not_a_file

log = logging.getLogger(__name__)

BUILTIN_PROMPTS = [
    "Give three tips for staying healthy.",
    "What is 17 + 25?",
    "Reverse the word 'merge'.",
    "Write one sentence about the sea.",
]
MARKER = "merge.json"  # only directories holding it may be replaced by --overwrite


# --------------------------------------------------------------------------- inputs


def stored_dtype(model: str) -> str:
    """The dtype a model's weights are stored in (config.json), as fp32/bf16/fp16."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolve_model_path(model))
    name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name.removeprefix("torch."), "fp32")


def verification_inputs(adapter_dir: Path, tokenizer: Any, n: int, max_len: int = 128) -> list:
    """Token ids of held-out examples: the run's test split (prompt + reference answer + EOS)
    when the adapter sits in a run, else built-in prompts."""
    from tuneoff.data import prompt_ids, read_splits, response_text

    splits = adapter_dir.parent.parent / "splits"
    records = read_splits(splits)[0]["test"][:n] if (splits / "manifest.json").is_file() else []
    if records:
        answers = [
            tokenizer(response_text(r), add_special_tokens=False)["input_ids"] for r in records
        ]
        rows = [
            prompt_ids(r, tokenizer) + a + [tokenizer.eos_token_id]
            for r, a in zip(records, answers)
        ]
    else:
        rows = [prompt_ids({"instruction": p, "input": ""}, tokenizer) for p in BUILTIN_PROMPTS[:n]]
    return [torch.tensor([r[:max_len]]) for r in rows if r]


@torch.no_grad()
def logits_of(
    model: torch.nn.Module, inputs: list[torch.Tensor], device: str
) -> list[torch.Tensor]:
    model.eval()
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in inputs]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def load_base(model: str, device: str, quantize_from: torch.dtype | None = None) -> Any:
    """The base in fp32; with `quantize_from`, QLoRA's 4-bit NF4 base exactly as the qlora arm
    builds it (`tuneoff.model.quantize_4bit` on the weights cast to `quantize_from`), computing
    in fp32."""
    from transformers import AutoModelForCausalLM

    from tuneoff.model import quantize_4bit

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(model), dtype=torch.float32)
    if quantize_from is None:
        return base.to(device)
    base.to(quantize_from)
    quantize_4bit(base, torch.float32, device)
    for p in base.parameters():  # the unquantized rest (embeddings, norms) computes in fp32
        if type(p).__name__ != "Params4bit":
            p.data = p.data.to(device, torch.float32)
    return base


def dequantize(model: torch.nn.Module) -> torch.nn.Module:
    """Every 4-bit linear layer back to an fp32 nn.Linear. Must run before any forward pass:
    bitsandbytes' CPU kernels repack the 4-bit weights in place on their first call."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            layer = torch.nn.Linear(
                child.in_features, child.out_features, child.bias is not None, weight.device
            )
            layer.weight.data = weight.float()
            if child.bias is not None:
                layer.bias.data = child.bias.data.float()
            setattr(module, name, layer)
    model.is_loaded_in_4bit = False
    return model


def qlora_source_dtype(adapter_dir: Path) -> torch.dtype:
    """The dtype the qlora arm cast its base to before quantizing (its frozen-weights dtype),
    from the arm's config and runtime; fp32 for an adapter outside a run."""
    from tuneoff.config import Config
    from tuneoff.model import Runtime, weights_dtype

    cfg = arm_config(adapter_dir)
    summary = adapter_dir.parent / "summary.json"
    if not cfg or not summary.is_file():
        return torch.float32
    runtime = json.loads(summary.read_text()).get("runtime", {})
    arm = Runtime(runtime.get("device", "cpu"), runtime.get("precision", "fp32"), "")
    return weights_dtype(Config(**cfg), arm)


def with_adapter(base: torch.nn.Module, adapter_dir: Path) -> torch.nn.Module:
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as err:
        raise ModelError(
            f"adapter {adapter_dir} does not fit this base model: {error_detail(err)}"
        ) from None


def _free() -> None:
    """Return the memory of models just deleted (`del model` first)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- merge


def check_merge_options(out: str, overwrite: bool, examples: int, tolerance: float) -> Path:
    """`tuneoff merge`'s options, before any model is loaded: `out` must be a directory that can
    be created, and may replace only an earlier merge output, only with --overwrite. Returns
    `out` as a Path; a bad option is a one-line UsageError."""
    if not out:  # Path("") is the current directory
        raise UsageError("--out is empty: pass the directory to write the merged model to")
    out = Path(out)
    check_not_a_file(out, "--out")
    check_creatable(out.parent, out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"{out} already exists: pass --overwrite or choose another --out")
        if not (out / MARKER).is_file():
            raise UsageError(
                f"{out} exists and is not a tuneoff merge output; refusing to replace it: "
                "choose another --out"
            )
    if examples < 1 or not tolerance > 0:
        raise UsageError("--examples must be >= 1 and --tolerance above 0")
    return out


def check_creatable(directory: Path, out: Path) -> None:
    """Can directories be made in `directory` (where `<out>.partial` goes)? Tried, with an
    empty directory made and removed at once in its nearest existing ancestor, since os.access
    says yes to root where nothing can be made (/proc, a read-only mount)."""
    existing = next(p for p in (directory.absolute(), *directory.absolute().parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".tuneoff-merge-check-", dir=existing))
    except OSError as err:
        raise UsageError(
            f"--out {out}: cannot be created ({err.strerror}); choose a writable place"
        ) from None


def merge_adapter(
    source: Path,
    out: Path,
    model: str | None = None,
    dtype: str = "auto",
    examples: int = 4,
    tolerance: float = 1e-4,
    quantized: bool | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Merge the adapter of `source` (an adapter dir or a lora/qlora arm dir) into its base and
    write a safetensors model + tokenizer + merge.json to `out`. Raises ModelError, writing
    nothing, when the merged logits differ from base + adapter by more than `tolerance` (fp32),
    a weight is not finite, or the written model reads back different. `quantized` (default:
    the arm's method is qlora) merges onto the dequantized 4-bit base."""
    adapter_dir = find_adapter_dir(source)
    check_adapter(adapter_dir)
    base = model or base_model_of(adapter_dir)
    check_model(base)
    if quantized is None:
        quantized = arm_config(adapter_dir).get("method") == "qlora"
    quantize_from = qlora_source_dtype(adapter_dir) if quantized else None
    out_dtype = stored_dtype(base) if dtype == "auto" else dtype
    inputs = verification_inputs(adapter_dir, load_tokenizer(base), examples)
    report: dict[str, Any] = {
        "base_model": base,
        "adapter": str(adapter_dir),
        "quantized_base": quantized,
        "dtype": out_dtype,
        "examples": len(inputs),
        "tokens": sum(int(i.numel()) for i in inputs),
        "tolerance": tolerance,
    }
    references = _references(base, adapter_dir, inputs, device, quantize_from) if quantized else {}
    log.info("merging %s into %s%s", adapter_dir, base, " (dequantized 4-bit)" if quantized else "")
    merged = load_base(base, device, quantize_from)
    merged = with_adapter(dequantize(merged) if quantized else merged, adapter_dir)
    unmerged_logits = logits_of(merged, inputs, device)
    merged = merged.merge_and_unload()
    check_finite(merged)
    merged_logits = logits_of(merged, inputs, device)
    report["max_abs_diff"] = max_abs_diff(merged_logits, unmerged_logits)
    for key, logits in references.items():
        report[key] = max_abs_diff(merged_logits, logits)
    if not report["max_abs_diff"] <= tolerance:  # also catches NaN
        raise ModelError(
            f"merge check failed: max |logit difference| {report['max_abs_diff']:.3g} between the "
            f"merged model and base + adapter exceeds {tolerance:g}; nothing written "
            "(pass --tolerance to accept a larger difference)"
        )
    merged = merged.to(DTYPES[out_dtype])
    check_finite(merged)  # again: a cast to fp16 can overflow to Inf
    partial = out.with_name(out.name + ".partial")  # renamed to `out` once read back
    _claim_partial(partial)
    _write(merged, adapter_dir, partial, report["base_model"])
    del merged  # before the read-back, so that one copy of the model is in memory at a time
    _free()
    _check_written(partial, merged_logits, inputs, report, device)
    (partial / MARKER).write_text(json.dumps(report, indent=2) + "\n")
    (partial / PARTIAL).unlink()
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    return report


def format_merge(r: dict[str, Any], out: Path) -> str:
    """What `tuneoff merge` prints of `merge_adapter`'s report once the merge is written."""
    base = "dequantized 4-bit base" if r["quantized_base"] else "base"
    lines = [
        f"check: max |logit difference| merged vs {base} + adapter: {r['max_abs_diff']:.3g} "
        f"(fp32, {r['examples']} examples, {r['tokens']} tokens; limit {r['tolerance']:g})"
    ]
    if r["quantized_base"]:
        lines.append(f"       vs 4-bit base + adapter: {r['max_abs_diff_vs_4bit']:.3g}")
        lines.append(f"       vs full-precision base + adapter: {r['max_abs_diff_vs_full']:.3g}")
    lines.append(
        f"read back with transformers ({r['dtype']}): max |logit difference| "
        f"{r['max_abs_diff_reloaded']:.3g}"
    )
    lines.append(f"\nmerged model ({r['dtype']}, safetensors + tokenizer): {out}")
    return "\n".join(lines)


def _references(base: str, adapter_dir: Path, inputs: list, device: str, source: Any) -> dict:
    """For a QLoRA adapter, logits of the 4-bit base + adapter (as it trained) and of the
    original full-precision base + adapter; each model is freed before the next loads."""
    refs = {}
    for key, quantize_from in (("max_abs_diff_vs_4bit", source), ("max_abs_diff_vs_full", None)):
        log.info("reference logits: %s base + adapter", "4-bit" if quantize_from else "full")
        model = with_adapter(load_base(base, device, quantize_from), adapter_dir)
        refs[key] = logits_of(model, inputs, device)
        del model
        _free()
    return refs


PARTIAL = "tuneoff-merge-partial"  # marks a merge being written (a crash may leave it)


def _claim_partial(directory: Path) -> None:
    """The merge is written beside `--out` first; only a merge's own leftover may be replaced."""
    from tuneoff.runs import UsageError

    if directory.exists() and any(directory.iterdir()):
        if not (directory / PARTIAL).is_file():
            raise UsageError(
                f"{directory} exists and is not a tuneoff merge in progress: merge writes "
                "there first; move it or choose another --out"
            )
        shutil.rmtree(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # checked before loading, but the file system may have changed
        raise UsageError(
            f"--out: {directory} cannot be created ({err.strerror}); choose a writable place"
        ) from None
    (directory / PARTIAL).write_text("")


def _write(merged: Any, adapter_dir: Path, directory: Path, base: str) -> None:
    from transformers import AutoTokenizer

    merged.save_pretrained(directory, safe_serialization=True)
    share_like_other_files(directory)
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer_src = adapter_dir if has_tokenizer else resolve_model_path(base)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(directory)


def _check_written(directory: Path, logits: list, inputs: list, report: dict, device: str) -> None:
    """Read the written model back with plain transformers, in its stored dtype as a user
    would: in fp32 its logits must match the merged model's; in bf16/fp16 the difference is the
    rounding, reported. On a mismatch the directory is removed."""
    log.info("written to %s; reading it back with transformers", directory)
    reloaded = load_saved(directory, device)
    report["max_abs_diff_reloaded"] = max_abs_diff(logits_of(reloaded, inputs, device), logits)
    del reloaded
    _free()
    if report["dtype"] == "fp32" and not report["max_abs_diff_reloaded"] <= report["tolerance"]:
        shutil.rmtree(directory)
        raise ModelError(
            f"merge check failed: the written model, read back, differs by "
            f"{report['max_abs_diff_reloaded']:.3g} from the merged model; nothing written"
        )


def check_finite(model: torch.nn.Module) -> None:
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(
                f"merged weight {name} contains NaN or Inf; nothing written (check the adapter "
                "and, for --dtype fp16, that the weights fit fp16's range)"
            )


def load_saved(path: Path, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)


# --------------------------------------------------------------------------- deployment figures


def _bytes_on_disk(directory: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern))


def _param_bytes(params: list[torch.nn.Parameter], dtype: torch.dtype) -> int:
    return sum(p.numel() for p in params) * torch.empty((), dtype=dtype).element_size()


def measure_deployment(
    run_dir: Path, counts: tuple[int, ...] = (1, 3, 10), repeats: int = 20
) -> dict:
    """Deployment figures of a run's ok LoRA-type arms, written to `<run>/deployment.json`.
    Memory is weights only, in the base's stored dtype: N adapters on one base = base + N
    adapters; N merged models = N copies of the base. Switch latency: median time of one
    forward pass after switching adapters, minus the median without a switch."""
    from tuneoff.engine import Engine

    arms = [a for a in ("lora", "qlora") if _ok(run_dir / a) and (run_dir / a / "adapter").is_dir()]
    if not arms:
        return {}
    adapters = {a: find_adapter_dir(run_dir / a) for a in arms}
    base = base_model_of(adapters[arms[0]])
    dtype = stored_dtype(base)
    # Two names even for one arm: the second copy makes a switch between two loaded adapters.
    names = {f"{a}_{i}": adapters[a] for a in arms for i in range(2 if len(arms) == 1 else 1)}
    device = json.loads((run_dir / arms[0] / "summary.json").read_text())["runtime"]["device"]
    engine = Engine(base, names, device=device, dtype="fp32")
    lora_params = {
        n: [p for k, p in engine.model.named_parameters() if f".{n}." in k] for n in names
    }
    base_params = [p for k, p in engine.model.named_parameters() if "lora_" not in k]
    base_bytes = _param_bytes(base_params, DTYPES[dtype])
    out: dict[str, Any] = {
        "base_model": base,
        "stored_dtype": dtype,
        "base_params": sum(p.numel() for p in base_params),
        "base_bytes": base_bytes,
        "arms": {},
    }
    if (run_dir / "full" / "model").is_dir():
        out["full_model_bytes_on_disk"] = _bytes_on_disk(run_dir / "full" / "model")
    for arm in arms:
        name = next(n for n in names if n.startswith(arm))
        adapter_bytes = _param_bytes(lora_params[name], DTYPES[dtype])
        out["arms"][arm] = {
            "adapter_bytes_on_disk": _bytes_on_disk(adapters[arm], "adapter_model.safetensors"),
            "adapter_params": sum(p.numel() for p in lora_params[name]),
            "adapter_bytes": adapter_bytes,
            "adapter_share_of_base": adapter_bytes / base_bytes,
            "memory_bytes": {
                str(n): {
                    "one_base_n_adapters": base_bytes + n * adapter_bytes,
                    "n_merged": n * base_bytes,
                }
                for n in counts
            },
        }
    out["switch"] = measure_switch(engine, list(names)[:2], repeats)
    (run_dir / "deployment.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def _ok(arm_dir: Path) -> bool:
    path = arm_dir / "summary.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "ok"


@torch.no_grad()
def measure_switch(engine: Any, names: list[str], repeats: int) -> dict[str, Any]:
    """Median ms, over `repeats` interleaved rounds, of: a forward pass of a built-in prompt with
    the adapter already active; set_adapter to the other adapter + the same forward pass; and
    set_adapter alone. The switch overhead is the difference of the first two medians."""
    from tuneoff.measure import Stopwatch

    prompt = [{"role": "user", "content": BUILTIN_PROMPTS[0]}]
    ids = torch.tensor([engine.chat_prompt_ids(prompt)], device=engine.device)
    model = engine.model

    def timed(fn: Any) -> float:
        watch = Stopwatch(engine.device)
        with watch:
            fn()
        return watch.total_s * 1000

    def forward() -> None:
        model(input_ids=ids)

    def switch_and_forward() -> None:
        model.set_adapter(names[1] if model.active_adapter == names[0] else names[0], True)
        model(input_ids=ids)

    def switch() -> None:
        model.set_adapter(names[1] if model.active_adapter == names[0] else names[0], True)

    for _ in range(5):  # warm-up
        switch_and_forward()
    rounds = [(timed(forward), timed(switch_and_forward), timed(switch)) for _ in range(repeats)]
    same, switched, set_only = (statistics.median(column) for column in zip(*rounds))
    return {
        "forward_ms": same,
        "switch_and_forward_ms": switched,
        "set_adapter_ms": set_only,
        "switch_overhead_ms": switched - same,
        "prompt_tokens": int(ids.numel()),
        "repeats": repeats,
        "device": engine.device,
    }
