"""Offline default for ``tuneoff compare``: synthetic instruction data and a tiny base model."""

from pathlib import Path

from tuneoff.embedded.synthetic import TASK_FAMILIES, check_answer, generate_records

TINY_MODEL_DIR = Path(__file__).resolve().parent / "tiny-qwen2"

__all__ = ["TASK_FAMILIES", "TINY_MODEL_DIR", "check_answer", "generate_records"]
