"""Measurement: timers, memory peaks, environment. Every figure tuneoff reports comes from here.

CUDA timers synchronize before reading; memory is reported in GiB (CUDA: max allocated and max
reserved since the last reset; CPU: the peak resident set size of this process).
"""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

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
