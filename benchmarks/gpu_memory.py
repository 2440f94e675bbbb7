"""GPU figures of the memory issue, in one short device call: the Qwen2.5-1.5B architecture with
random weights (no download), the reference's batch settings (micro-batch 4 x 256 tokens,
accumulation 16), each case in its own process under `memory_budget` (default 16GiB).

For each case: the planner's prediction, then real steps (`tuneoff.measure.measure`: one full
accumulation window, its optimizer step and one evaluation batch) with torch.cuda's allocated and
reserved peaks, predicted / measured, and the issue's target where it has one. An OOM under the
budget is a result (status "oom", the memory reached, and the planner's advice).

    python benchmarks/gpu_memory.py --out $OUT/memory.json            # about 3 minutes on an H200
    python benchmarks/gpu_memory.py --cases lora,full_lean --budget 24GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RECIPE = {  # the reference: fp32 weights, fp16 autocast + GradScaler, padded, full-vocab logits
    "batching": "padded",
    "loss_chunk_size": 0,
    "weights_dtype": "fp32",
    "fused_optimizer": False,
    "lean_activations": False,
    "precision": "fp16",
}
CASES = {
    # name: (overrides, target on peak reserved GiB or None, what the target is); most
    # important first, since the device call has a time limit and results are written as they come
    "full_lean": (
        {
            "method": "full",
            "optimizer": "adamw_lean",
            "weights_dtype": "bf16",
            "gradient_checkpointing": True,
        },
        14.5,
        "full fine-tuning under 16GiB, reserved <= 14.5 GiB",
    ),
    "lora": ({"method": "lora"}, 6.5, "LoRA without checkpointing <= 6.5 GiB"),
    "lora_checkpointing": (
        {"method": "lora", "gradient_checkpointing": True},
        4.5,
        "LoRA with checkpointing <= 4.5 GiB",
    ),
    "lora_reference_recipe": ({"method": "lora", **RECIPE}, None, "near the reference's 13.4"),
    "full_reference_recipe": ({"method": "full", **RECIPE}, None, "does not fit 16 GiB"),
    "qlora_checkpointing": (
        {"method": "qlora", "gradient_checkpointing": True},
        None,
        "needs bitsandbytes",
    ),
    "lora_without_lean_activations": (
        {"method": "lora", "lean_activations": False},
        None,
        "the same as lora, with autograd's stock saved tensors: what lean activations save",
    ),
}
GIB = 2**30


def run_case(name: str, budget: str, model: str) -> dict:
    """One case in this process (called as a worker)."""
    import torch

    from tuneoff.arm import apply_memory_budget
    from tuneoff.config import resolve
    from tuneoff.measure import measure
    from tuneoff.model import choose_runtime, load_arch_config
    from tuneoff.plan import advise, predict

    overrides, target, what = CASES[name]
    # The seed preset's batch settings; tuneoff's own cases in bf16 autocast (the preset's fp16
    # is the reference's, kept by the recipe cases).
    values = {"precision": "auto", **overrides, "model": model, "memory_budget": budget}
    cfg, _ = resolve("seed", None, values)
    runtime = choose_runtime(cfg)
    limit = apply_memory_budget(cfg, runtime)
    arch = load_arch_config(model)
    out = {"case": name, "overrides": overrides, "target": what, "budget": budget}
    pred = predict(cfg, arch, runtime, both_checkpointing=False)
    out["predicted"] = pred.to_dict()
    started = time.perf_counter()
    try:
        measured = measure(cfg, arch, runtime)
        out["status"] = "ok"
        out["measured_gib"] = {k: v / GIB for k, v in measured.items()}
    except torch.OutOfMemoryError as err:
        out["status"] = "oom"
        out["error"] = str(err).splitlines()[0]
        out["measured_gib"] = {
            "cuda_peak_allocated": torch.cuda.max_memory_allocated() / GIB,
            "cuda_peak_reserved": torch.cuda.max_memory_reserved() / GIB,
        }
        out["advice"] = advise(cfg, arch, runtime, limit or pred.device_total, pred)
    out["time_s"] = time.perf_counter() - started
    m = out["measured_gib"]
    if out["status"] == "ok" and "cuda_peak_allocated" in m:
        out["predicted_over_measured"] = {
            "allocated": pred.peak_allocated / GIB / m["cuda_peak_allocated"],
            "reserved": pred.peak_reserved / GIB / m["cuda_peak_reserved"],
        }
    if target is not None:
        out["target_gib"] = target
        reserved = m.get("cuda_peak_reserved", float("inf"))
        out["meets_target"] = out["status"] == "ok" and reserved <= target
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--budget", default="16GiB")
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--out", help="write the JSON here (default: print)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_case(args.worker, args.budget, args.model)), flush=True)
        return 0
    import torch

    results = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cases": [],
    }
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    for name in args.cases.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--budget",
            args.budget,
            "--model",
            args.model,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if lines:
            case = json.loads(lines[-1][len("RESULT ") :])
        else:
            case = {"case": name, "status": "failed", "error": proc.stderr.strip()[-800:]}
        results["cases"].append(case)
        if args.out:  # after every case: a time limit loses only the case running
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        m = case.get("measured_gib", {})
        print(
            f"{name:24s} {case['status']:6s} predicted "
            f"{case.get('predicted', {}).get('peak_reserved_gib', float('nan')):6.2f} "
            f"reserved, measured {m.get('cuda_peak_reserved', float('nan')):6.2f} reserved "
            f"({m.get('cuda_peak_allocated', float('nan')):6.2f} allocated)",
            flush=True,
        )
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
