"""GPU check of the compare pipeline: the reference experiment's recipe (`--preset seed`) on the
exact Qwen2.5-1.5B-Instruct architecture with random weights (no download), both arms.

    python benchmarks/gpu_p0.py --out $OUT          # about 4-6 minutes on one H200

Random weights of the exact architecture give exact memory and speed figures. The tokenizer is
the embedded tiny one (its ids are a subset of Qwen's vocabulary); examples are built so that their
token lengths follow alpaca-cleaned under the Qwen tokenizer as estimated in the issue (mean about
190, median about 155, about 30% longer than 256), so padding and truncation are realistic.
Writes `gpu_p0.json` (one row per arm: status, peak memory, time, throughput) and the run's
report to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARCH = ROOT / "src" / "tuneoff" / "archs" / "qwen2.5-1.5b-instruct.json"


def make_random_model(target: Path, arch: Path = ARCH) -> None:
    """The exact architecture with random weights, saved in bf16 (loaded as fp32 by tuneoff)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tuneoff.embedded import TINY_MODEL_DIR

    config = AutoConfig.for_model(**json.loads(arch.read_text()))
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    config.eos_token_id, config.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def make_alpaca_like(path: Path, n: int, seed: int = 0) -> dict[str, float]:
    """Records whose total token length is log-normal (median 155, mean ~190) under the tiny
    tokenizer; a third of each example is prompt. Returns the measured length statistics."""
    from transformers import AutoTokenizer

    from tuneoff.embedded import TINY_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    rng = random.Random(seed)
    words = [
        rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") + rng.choice("nrst") for _ in range(400)
    ]
    per_word = len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) / len(words)
    sigma = math.sqrt(2 * math.log(190 / 155))  # mean/median = exp(sigma^2 / 2)
    lengths, rows = [], []
    for _ in range(n):
        total = max(12, int(rng.lognormvariate(math.log(155), sigma)))
        prompt_words = max(3, int(total / 3 / per_word))
        answer_words = max(1, int(total * 2 / 3 / per_word))
        record = {
            "instruction": " ".join(rng.choices(words, k=prompt_words)),
            "input": "",
            "output": " ".join(rng.choices(words, k=answer_words)),
        }
        rows.append(json.dumps(record))
        lengths.append(total)
    path.write_text("\n".join(rows) + "\n")
    lengths.sort()
    return {
        "mean": sum(lengths) / n,
        "median": lengths[n // 2],
        "share_over_256": sum(x > 256 for x in lengths) / n,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneoff-gpu"))
    parser.add_argument("--examples", type=int, default=3000)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--arch", type=Path, default=ARCH, help="a config.json (for a dry run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir, data = args.work / "qwen2.5-1.5b-random", args.work / "alpaca-like.jsonl"
    if not model_dir.exists():
        make_random_model(model_dir, args.arch)
    lengths = make_alpaca_like(data, args.examples)
    run = args.work / "seed-run"
    cmd = [
        sys.executable,
        "-m",
        "tuneoff",
        "compare",
        "--preset",
        "seed",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--max-steps",
        str(args.max_steps),
        "--output-dir",
        str(run),
        "--overwrite",
        "eval_every=0",
        "gen_examples=8",
        "gen_max_new_tokens=32",
        "eval_train_examples=64",
    ]
    code = subprocess.run(cmd).returncode
    rows = {}
    for arm in ("base", "lora", "full"):
        path = run / arm / "summary.json"
        if path.is_file():
            s = json.loads(path.read_text())
            rows[arm] = {
                k: s.get(k)
                for k in (
                    "status",
                    "error",
                    "memory",
                    "memory_overall",
                    "training",
                    "params",
                    "runtime",
                    "total_time_s",
                )
            }
            rows[arm]["val"] = (s.get("metrics") or {}).get("val")
    result = {
        "command": " ".join(cmd),
        "exit_code": code,
        "data_lengths": lengths,
        "wall_s": time.perf_counter() - started,
        "arms": rows,
    }
    (args.out / "gpu_p0.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("report.md", "loss_curves.png"):
        if (run / name).is_file():
            shutil.copy(run / name, args.out / name)
    print(
        json.dumps({arm: {"status": r["status"], "memory": r["memory"]} for arm, r in rows.items()})
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
