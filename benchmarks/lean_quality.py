"""Quality guard of the memory-lean full fine-tuning: the embedded default (tiny preset) trained
with fp32 master weights + torch AdamW, and with bf16 weights + LeanAdamW (bf16 moments,
stochastic rounding), optionally 8-bit AdamW; same data, seed and schedule. The issue's bar: the
lean run's final val loss within 2% of the fp32 run's.

    python benchmarks/lean_quality.py --out benchmarks/results/lean_quality.json   # CPU, ~3 min
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "fp32_adamw": [],
    "bf16_adamw_lean": ["optimizer=adamw_lean", "weights_dtype=bf16"],
    "fp32_adamw_lean": ["optimizer=adamw_lean"],
    "fp32_adamw8bit": ["optimizer=adamw8bit"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32_adamw,bf16_adamw_lean,fp32_adamw_lean")
    parser.add_argument("--out")
    parser.add_argument("extra", nargs="*", help="key=value overrides for every variant")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            run = Path(tmp) / name
            cmd = [sys.executable, "-m", "tuneoff", "train", "--method", "full", "--preset",
                   "tiny", "--output-dir", str(run), "gen_examples=0", "save_checkpoints=false",
                   *VARIANTS[name], *args.extra]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
            summary = json.loads((run / "full" / "summary.json").read_text())
            results[name] = {
                "val_loss": summary["metrics"]["val"]["loss"],
                "val_token_accuracy": summary["metrics"]["val"]["token_accuracy"],
                "train_time_s": summary["training"]["train_time_s"],
                "overrides": VARIANTS[name] + args.extra,
            }
            print(name, json.dumps(results[name]), flush=True)
    ref = results.get("fp32_adamw", {}).get("val_loss")
    for value in results.values():
        if ref:
            value["val_loss_vs_fp32_adamw"] = value["val_loss"] / ref - 1
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
