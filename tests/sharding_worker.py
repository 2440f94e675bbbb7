"""Run under torchrun by tests/test_sharding.py: one training step of full fine-tuning and of
LoRA through tuneoff's own setup (`prepare_model`, `make_optimizer`, `configure_deepspeed`,
Accelerate's `prepare`, `run_window`) under DDP, FSDP2 or DeepSpeed ZeRO-1/2/3 on CPU (gloo),
and the bytes this process then holds, counted storage by storage; written as JSON per rank."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
KIND = os.environ["TUNEOFF_TEST_SHARDING"]
SMALL = json.loads(os.environ["TUNEOFF_TEST_CONFIG"])  # the config keys the test predicts for
if KIND == "fsdp2":
    import fsdp_on_cpu  # noqa: F401  (the shims patch Accelerate when imported)
elif KIND.startswith("zero"):
    import deepspeed_on_cpu  # noqa: F401

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from tuneoff.config import Config  # noqa: E402
from tuneoff.model import choose_runtime, load_model, prepare_model  # noqa: E402
from tuneoff.optim import make_optimizer  # noqa: E402
from tuneoff.train import configure_deepspeed, run_window  # noqa: E402


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the distinct storages behind `tensors` (DTensors: their local shard), each once
    however many views share it; `seen` carries over between calls."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if t.device.type != "meta" and storage.nbytes() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def flat(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flat(v)]
    return []


def held(model, optimizer) -> dict[str, int]:
    """Weights (each parameter's local storage; ZeRO-3: its partition, and the whole weight
    where gathered) with buffers, gradients, fp32 masters and optimizer states (the AdamW
    moments: the 4-byte step counters, one per tensor, are left out, as the planner does)."""
    seen: set = set()
    params = list(model.parameters())
    weights = storage_bytes([*params, *(getattr(p, "ds_tensor", None) for p in params)], seen)
    out = {"weights": weights + storage_bytes(model.buffers(), seen)}
    zero = getattr(model, "optimizer", None)  # DeepSpeed's engine: its ZeRO optimizer
    if zero is not None and hasattr(zero, "optimizer"):
        out["master_weights"] = storage_bytes(
            flat(getattr(zero, "single_partition_of_fp32_groups", None))
            + flat(getattr(zero, "fp32_partitioned_groups_flat", None)), seen
        )  # fmt: skip
        optimizer = zero.optimizer
    states = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    out["optimizer"] = storage_bytes(states, seen)
    if hasattr(model, "_get_ddp_logging_data"):
        sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
        out["communication"] = sum(int(x) for x in sizes.split(",") if x)
    return out


def gradients(model) -> int:
    zero = getattr(model, "optimizer", None)
    if zero is not None and hasattr(zero, "optimizer"):  # reduced into ZeRO's partitions
        parts = getattr(zero, "averaged_gradients", None) or getattr(
            zero, "grad_partitions_flat_buffer", None
        )
        return storage_bytes(flat(parts), set())
    return storage_bytes([p.grad for p in model.parameters()], set())


def one_step(method: str, precision: str) -> dict[str, int]:
    AcceleratorState._reset_state(True)  # a fresh Accelerator (and DeepSpeed engine) per method
    GradientState._reset_state()
    cfg = Config(method=method, precision=precision, **SMALL)
    runtime = choose_runtime(cfg)
    accelerator = Accelerator(cpu=True, mixed_precision=runtime.mixed_precision)
    torch.manual_seed(0)
    model = prepare_model(load_model(cfg.model), cfg, runtime)
    optimizer = make_optimizer(model, cfg, "cpu")
    configure_deepspeed(accelerator, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    out: dict[str, int] = {}
    if KIND.startswith("zero"):  # the engine steps inside run_window: count before it does
        step = model.step
        model.step = lambda *a, **k: (out.update(gradients=gradients(model)), step(*a, **k))[1]
        run_window(model, accelerator, [batch])
    else:
        run_window(model, accelerator, [batch])
        out["gradients"] = gradients(model)
        optimizer.step()
    out.update(held(model, optimizer))
    return out


if __name__ == "__main__":
    result = {
        precision: {method: one_step(method, precision) for method in ("full", "lora")}
        for precision in ("fp32", "bf16")
    }
    rank = os.environ["RANK"]
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
