"""Data-parallel training under torchrun (2 CPU processes, gloo): one run directory, one report,
and the same updates as one process accumulating the same micro-batches, also when each process
cuts its examples by tokens (`micro_batch_tokens`: unequal micro-batch counts per process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ARGS = ["--method", "full", "--limit", "300", "--max-steps", "6", "gen_examples=0",
        "save_checkpoints=false", "eval_batch_size=32"]  # fmt: skip


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_equal_one_process_accumulating_their_micro_batches(tmp_path):
    torchrun = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2"]
    ddp = run([*torchrun, "-m", "tuneoff", "train", "--output-dir", str(tmp_path / "ddp"),
               *ARGS, "grad_accum=1"])  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert ddp.stdout.count("report:") == 1  # only rank 0 writes the report
    one = run([sys.executable, "-m", "tuneoff", "train", "--output-dir", str(tmp_path / "one"),
               *ARGS, "grad_accum=2"])  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    s_ddp = json.loads((tmp_path / "ddp" / "full" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "one" / "full" / "summary.json").read_text())
    assert s_ddp["runtime"]["world_size"] == 2 and s_one["runtime"]["world_size"] == 1
    # Rank r takes micro-batch r of each window: the same examples per optimizer step, and the
    # loss is normalized by the supervised tokens of the whole window across processes.
    assert s_ddp["training"]["optimizer_steps"] == s_one["training"]["optimizer_steps"] == 6
    ddp_train, one_train = s_ddp["training"], s_one["training"]
    assert ddp_train["train_supervised_tokens"] == one_train["train_supervised_tokens"]
    assert s_ddp["metrics"]["val"]["loss"] == pytest.approx(s_one["metrics"]["val"]["loss"],
                                                            rel=1e-5)  # fmt: skip
    cut = run([*torchrun, "-m", "tuneoff", "train", "--output-dir", str(tmp_path / "cut"),
               *ARGS, "grad_accum=1", "batch_size=32", "micro_batch_tokens=256"])  # fmt: skip
    assert cut.returncode == 0, cut.stderr[-2000:]
    one32 = run([sys.executable, "-m", "tuneoff", "train", "--output-dir", str(tmp_path / "o32"),
                 *ARGS, "grad_accum=2", "batch_size=32"])  # fmt: skip
    assert one32.returncode == 0, one32.stderr[-2000:]
    s_cut = json.loads((tmp_path / "cut" / "full" / "summary.json").read_text())
    s_o32 = json.loads((tmp_path / "o32" / "full" / "summary.json").read_text())
    assert s_cut["metrics"]["val"]["loss"] == pytest.approx(s_o32["metrics"]["val"]["loss"],
                                                            rel=1e-5)  # fmt: skip
