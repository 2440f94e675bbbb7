"""The host side of a training step, measured on a CPU: a proxy for a GPU step that waits on
kernel launches (the 2026-11-28 H200 profile of a LoRA micro-batch of 4: 866 ms of CPU against
136 ms of CUDA time).

Qwen2.5-1.5B's layout (28 layers, 12 heads, 2 key-value heads, its LoRA targets) at tiny widths
(hidden 96, head_dim 8, intermediate 128, vocab 1,000), so that a micro-batch of 16 short
packed examples costs almost nothing but per-op overhead: Python, autograd and dispatch, as the
CPU pays it before each CUDA launch. bf16 autocast, one thread, dropout masks from torch's
generator (`fast_dropout=false`, as on CUDA), and attention as one sdpa call per layer (as
flash varlen on CUDA; the CPU's per-example kernel is not what a GPU runs, so its segments are
not kept apart here: timing only). Per variant, each in a fresh process, in alternating rounds:
milliseconds per micro-batch (forward and backward, the median of `--steps` after warm-up) and
aten ops per micro-batch other than views (about the kernels a GPU would launch).

    OMP_NUM_THREADS=1 python benchmarks/launch_proxy.py --rounds 3      # about 2 minutes
    python benchmarks/launch_proxy.py --variants lora,lora:lean_activations=false --json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = "lora,lora:lean_activations=false,full"
VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select"}
VIEWS |= {"unsqueeze", "squeeze", "alias", "as_strided", "detach", "split", "split_with_sizes"}
VIEWS |= {"_local_scalar_dense"}  # a host read of a CPU scalar (the masks' seeds): no kernel


def measure(variant: str, steps: int) -> dict:
    """One variant in this process: ms per micro-batch and non-view aten ops."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from tuneoff import attention
    from tuneoff.batching import make_batch
    from tuneoff.bench import arm_config
    from tuneoff.config import Config
    from tuneoff.data import Example
    from tuneoff.loss import forward_loss
    from tuneoff.model import Runtime, load_arch_config, prepare_model

    def one_call(query, key, value, segments, scaling, dropout):  # flash varlen's one kernel
        out = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), is_causal=True, enable_gqa=True
        )
        return out.transpose(1, 2).to(value.dtype)

    attention._sdpa_per_example = one_call
    arch = load_arch_config("qwen2.5-1.5b")
    arch.hidden_size, arch.intermediate_size, arch.vocab_size, arch.head_dim = 96, 128, 1000, 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(arch, attn_implementation="sdpa")
    base = Config(max_seq_len=256, precision="bf16", fast_dropout=False)
    cfg = arm_config(base, variant)
    model = prepare_model(model, cfg, Runtime("cpu", "bf16", "proxy")).train()
    rng = random.Random(0)
    examples = []
    for _ in range(16):
        n = rng.randint(8, 16)
        ids = [rng.randrange(3, 1000) for _ in range(n)]
        examples.append(Example(ids, [-100] * (n // 2) + ids[n // 2 :], False))
    batch = make_batch(examples, 0, cfg)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_loss(model, batch, cfg.loss_chunk_size)
        loss.backward()

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    for _ in range(3):
        step()
    with Count() as count:
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    ops = sum(n for name, n in count.ops.items() if name not in VIEWS)
    return {"variant": variant, "ms_per_micro_batch": 1000 * statistics.median(times), "ops": ops}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=VARIANTS, help=f"comma-separated ({VARIANTS})")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    parser.add_argument("--steps", type=int, default=10, help="timed micro-batches (10)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.steps)))
        return 0
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs.setdefault(variant, []).append(json.loads(out.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(runs, indent=1))
        return 0
    for variant, results in runs.items():
        ms = ", ".join(f"{r['ms_per_micro_batch']:.0f}" for r in results)
        print(f"{variant:32s} ms per micro-batch {ms:20s} ops {results[0]['ops']:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
