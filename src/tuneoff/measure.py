"""Measurement: timers, memory peaks, environment. Every figure tuneoff reports comes from here.

CUDA timers synchronize before reading; memory is reported in GiB (CUDA: max allocated and max
reserved since the last reset; CPU: the peak resident set size of this process).

`measure` and `measure_arms` check the planner (`plan.py`) against real training steps with
random weights of the architecture, component by component (`tuneoff plan --measure`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import resource
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only: this module imports no other tuneoff module when loaded
    from tuneoff.config import Config
    from tuneoff.model import Runtime

GIB = 1024**3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Accumulates the time spent inside `with watch:` blocks (CUDA-synchronized)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.total_s = 0.0
        self._start = 0.0

    def __enter__(self) -> Stopwatch:
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.total_s += time.perf_counter() - self._start


class StepClock:
    """Times optimizer steps without adding host syncs: CUDA events on CUDA, else perf_counter."""

    def __init__(self, device: str) -> None:
        self.cuda = device == "cuda"
        self.spans: list[tuple[Any, Any]] = []
        self._start: Any = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._start = self._mark()

    def stop(self) -> None:
        if self._start is not None:
            self.spans.append((self._start, self._mark()))
            self._start = None

    def mean_ms(self) -> float | None:
        if not self.spans:
            return None
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / len(self.spans)
        return 1000 * sum(b - a for a, b in self.spans) / len(self.spans)


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB


def measure_memory(device: str) -> dict[str, float]:
    """Peaks since the last reset (CUDA) or over the process's life (CPU RSS)."""
    if device == "cuda":
        return {
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        }
    return {"peak_rss_gib": peak_rss_gib()}


def peak_memory_gib(memory: dict[str, float]) -> float:
    """The one figure for tables: reserved on CUDA (what the allocator held), else RSS."""
    return memory.get("peak_reserved_gib", memory.get("peak_rss_gib", float("nan")))


def measure_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tuneoff", "torch", "transformers", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    if torch.cuda.is_available():
        out["cuda"] = str(torch.version.cuda)
    return out


def git_sha() -> str | None:
    """The commit of the tuneoff checkout in use, with '-dirty' if it has local changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe_device(device: str) -> dict[str, Any]:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {
            "device": "cuda",
            "device_name": props.name,
            "device_memory_gib": props.total_memory / GIB,
            "device_count": torch.cuda.device_count(),
        }
    return {
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }


class TensorMemory:
    """Exact live bytes of the tensors created while active, and their peak: a dispatch mode
    that sees every op's outputs (on CPU, CUDA or the meta device) and a weak reference that
    sees each storage freed. Tensors of `model` (weights, buffers) and `existing` ones are not
    counted even when an op returns a view of them. Gradients of the model's weights are counted
    apart, as `grad_bytes`, from the moment they are accumulated, so `peak_bytes` is what one
    step adds: activations, logits and temporaries.
    """

    def __init__(
        self, model: torch.nn.Module | None = None, existing: tuple[torch.Tensor, ...] = ()
    ) -> None:
        tensors = [*(model.parameters() if model else ()), *(model.buffers() if model else ())]
        self.params = [p for p in tensors if p.requires_grad]
        self._known = [t.untyped_storage() for t in [*tensors, *existing]]
        self._known_ids = {id(s) for s in self._known}
        self.current = self.peak_bytes = self.grad_bytes = 0
        self._live: dict[int, tuple[Any, int, bool]] = {}
        self._mode = None
        self._hooks: list = []
        self._paused = False

    def __enter__(self) -> TensorMemory:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker._add(t)
                return out

        self._hooks = [p.register_post_accumulate_grad_hook(self._grad) for p in self.params]
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        for hook in self._hooks:
            hook.remove()

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Tensors made inside are not counted, nor later views of them (the planner's casts
        of weights under autocast, which it lists apart)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if self._paused:
            self._known.append(storage)
            self._known_ids.add(id(storage))
            return
        key = id(storage)
        if key in self._live or key in self._known_ids:
            return
        size = storage.nbytes()
        self._live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), size, False)
        self.current += size
        self.peak_bytes = max(self.peak_bytes, self.current)

    def _free(self, key: int) -> None:
        _, size, is_grad = self._live.pop(key, (None, 0, False))
        if is_grad:
            self.grad_bytes -= size
        else:
            self.current -= size

    def _grad(self, param: torch.Tensor) -> None:
        key = id(param.grad.untyped_storage())
        if key in self._live and not self._live[key][2]:
            ref, size, _ = self._live[key]
            self._live[key] = (ref, size, True)
            self.current -= size
            self.grad_bytes += size


# --------------------------------------------------------------------------- the planner's check


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights and buffers, 4-bit weights' quantization statistics included."""
    seen, total = set(), 0
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code]
            if getattr(state, "state2", None) is not None:
                tensors += [state.state2.absmax, state.state2.code]
    for t in tensors:
        if torch.is_tensor(t) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def measure(cfg: Config, arch_config: Any, runtime: Runtime) -> dict[str, Any]:
    """A few real steps with random weights of the exact architecture (no download): bytes by
    component counted tensor by tensor (exact on any device), and on CUDA the allocator's
    peaks over one full accumulation window."""
    from transformers import AutoModelForCausalLM

    from tuneoff.loss import forward_stats
    from tuneoff.model import prepare_model
    from tuneoff.optim import make_optimizer, optimizer_state_bytes
    from tuneoff.trace import forward_backward, trace_batch

    torch.manual_seed(cfg.seed)
    with torch.device(runtime.device):  # random weights made where they will live
        model = AutoModelForCausalLM.from_config(
            arch_config, dtype=torch.float32, attn_implementation="sdpa"
        )
    model = prepare_model(model, cfg, runtime).to(runtime.device)
    model.train()
    optimizer = make_optimizer(model, cfg, runtime.device)
    vocab = arch_config.vocab_size

    def batch(eval_batch: bool = False) -> dict[str, torch.Tensor]:
        b = trace_batch(cfg, runtime.device, eval_batch)
        b["input_ids"] = torch.randint(0, vocab, b["input_ids"].shape, device=runtime.device)
        return {**b, "labels": b["input_ids"].clone()}

    autocast = (
        torch.autocast(
            runtime.device, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[runtime.precision]
        )
        if runtime.precision != "fp32"
        else contextlib.nullcontext()
    )
    out: dict[str, Any] = {"weights": _weight_bytes(model)}
    with autocast:
        forward_backward(model, [batch()], True, cfg.loss_chunk_size)  # optimizer states exist
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        peaks = {}
        for with_loss in (False, True):
            window = [batch()]  # one micro-batch: later ones reach the same peak
            existing = tuple(t for b in window for t in b.values())
            with TensorMemory(model, existing) as memory:
                forward_backward(model, window, with_loss, cfg.loss_chunk_size)
            peaks[with_loss] = memory.peak_bytes
            out["gradients"] = sum(
                p.grad.numel() * p.grad.element_size()
                for p in model.parameters()
                if p.grad is not None
            )
            optimizer.zero_grad(set_to_none=True)
        out["activations"] = peaks[False]
        out["logits_and_loss"] = max(0, peaks[True] - peaks[False])
        out["optimizer"] = optimizer_state_bytes(optimizer)
        model.eval()
        eval_batch = batch(eval_batch=True)
        with TensorMemory(model, tuple(eval_batch.values())) as memory:
            forward_stats(model, eval_batch, cfg.loss_chunk_size)
        out["evaluation"] = memory.peak_bytes
        model.train()
        if runtime.device == "cuda":
            out.update(_cuda_window(model, optimizer, cfg, batch))
    return out


def _cuda_window(model, optimizer, cfg: Config, batch) -> dict[str, int]:
    """The allocator's peaks over one accumulation window, its optimizer step, and one
    evaluation batch: what `torch.cuda.max_memory_allocated` says a real step needs."""
    from tuneoff.loss import forward_stats
    from tuneoff.trace import forward_backward

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(model, [batch() for _ in range(cfg.grad_accum)], True, cfg.loss_chunk_size)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    forward_stats(model, batch(eval_batch=True), cfg.loss_chunk_size)
    model.train()
    torch.cuda.synchronize()
    return {
        "cuda_peak_allocated": torch.cuda.max_memory_allocated(),
        "cuda_peak_reserved": torch.cuda.max_memory_reserved(),
    }


def measure_arms(cfg: Config, methods: list[str], arch_config: Any) -> dict[str, Any]:
    """`tuneoff plan --measure`: for each method, the prediction for this machine's runtime
    beside a measurement of real steps with random weights of the architecture."""
    import gc

    from tuneoff.model import choose_runtime
    from tuneoff.plan import predict

    runtime = choose_runtime(cfg)
    out: dict[str, Any] = {"runtime": {"device": runtime.device, "precision": runtime.precision}}
    for method in methods:
        arm_cfg = cfg.replace(method=method)
        pred = predict(arm_cfg, arch_config, runtime, both_checkpointing=False)
        measured = measure(arm_cfg, arch_config, runtime)
        predicted = {
            **pred.components,
            "peak_allocated": pred.peak_allocated,
            "peak_reserved": pred.peak_reserved,
        }
        if "cuda_peak_allocated" in measured:
            measured["peak_allocated"] = measured.pop("cuda_peak_allocated")
            measured["peak_reserved"] = measured.pop("cuda_peak_reserved")
        out[method] = {
            "predicted_gib": {k: v / GIB for k, v in predicted.items()},
            "measured_gib": {k: v / GIB for k, v in measured.items()},
        }
        gc.collect()
        if runtime.device == "cuda":
            torch.cuda.empty_cache()
    return out
