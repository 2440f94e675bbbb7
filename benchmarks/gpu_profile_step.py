"""Where does a training step go? Times the tuneoff window (16 micro-batches of 4, seed recipe:
fp32 weights, fp16 autocast + GradScaler) for lora and full on the exact Qwen2.5-1.5B
architecture with random weights, then profiles one LoRA window.

    python benchmarks/gpu_profile_step.py --out $OUT      # about 2 minutes on one H200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    from accelerate import Accelerator
    from gpu_p0 import ARCH, make_alpaca_like
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuneoff.batching import collate
    from tuneoff.config import Config
    from tuneoff.data import load_records, tokenize_split
    from tuneoff.embedded import TINY_MODEL_DIR
    from tuneoff.model import prepare_model
    from tuneoff.train import run_window

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--arch", type=Path, default=ARCH)
    parser.add_argument("--windows", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = Accelerator(mixed_precision="fp16" if device == "cuda" else "no")
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    data_path = Path("/tmp/alpaca-like-profile.jsonl")
    make_alpaca_like(data_path, 400)
    examples, _ = tokenize_split(load_records(str(data_path)), tokenizer, Config())
    windows = [
        [collate(examples[w * 64 + i * 4 : w * 64 + i * 4 + 4], tokenizer.pad_token_id)
         for i in range(16)]
        for w in range(args.windows + 1)
    ]  # fmt: skip
    config = AutoConfig.for_model(**json.loads(args.arch.read_text()))
    results = {}
    for method in ("lora", "full"):
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = prepare_model(model, Config(method=method))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
        model, optimizer = accelerator.prepare(model, optimizer)
        times = []
        for window in windows:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run_window(model, accelerator, window)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        tokens = sum(int(b["attention_mask"].sum()) for w in windows[1:] for b in w)
        stats = torch.cuda.memory_stats() if device == "cuda" else {}
        results[method] = {
            "window_s": times,
            "tokens_per_s_after_warmup": tokens / sum(times[1:]),
            "alloc_retries": stats.get("num_alloc_retries"),
            "peak_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
        }
        print(method, json.dumps(results[method]), flush=True)
        if method == "lora":
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=activities) as prof:
                run_window(model, accelerator, windows[1][:4])
                if device == "cuda":
                    torch.cuda.synchronize()
            averages = prof.key_averages()
            for key in ("self_cpu_time_total", "self_device_time_total", "self_cuda_time_total"):
                try:
                    table = averages.table(sort_by=key, row_limit=18)
                except (KeyError, AttributeError, ValueError, RuntimeError):
                    continue
                (args.out / f"profile_lora_{key}.txt").write_text(table)
                print(table[:6000], flush=True)
        del model, optimizer
        accelerator.free_memory()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    (args.out / "profile_step.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
