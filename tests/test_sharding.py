"""Per-process memory under DDP, FSDP2, ZeRO-1/2/3 (2 gloo processes) equals the plan; its CLI."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from test_distributed import FSDP2, run

from tuneoff.cli import main
from tuneoff.config import Config
from tuneoff.model import choose_runtime, load_arch_config
from tuneoff.sharding import Sharding, predict_sharded

WORKER = str(Path(__file__).with_name("sharding_worker.py"))
HELD = ("weights", "gradients", "optimizer", "master_weights")
KINDS = ["ddp", "fsdp2", "zero1", "zero2", "zero3"]
SMALL = {"model": "embedded:tiny-qwen2", "device": "cpu", "batch_size": 1, "max_seq_len": 32,
         "eval_batch_size": 1}  # fmt: skip
HIDDEN = 128  # embedded:tiny-qwen2's: what Accelerate fills DeepSpeed's "auto" sizes from


def launch(kind: str, out: Path) -> dict[str, dict]:
    """Both ranks' held bytes per precision and method, from one torchrun launch."""
    env = {"TUNEOFF_TEST_SHARDING": kind, "TUNEOFF_TEST_CONFIG": json.dumps(SMALL)}
    if kind == "fsdp2":
        env.update(FSDP2)
    if kind.startswith("zero"):
        # "auto" sizes (Accelerate fills them from the hidden size) so that ZeRO-3 partitions
        # the tiny model's weights: DeepSpeed's default keeps every weight under 1e5 whole.
        config = out / "ds.json"
        auto = {"stage": int(kind[-1]), "reduce_bucket_size": "auto"}
        auto.update(stage3_prefetch_bucket_size="auto", stage3_param_persistence_threshold="auto")
        config.write_text(json.dumps({"zero_optimization": auto}))
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=kind[-1],
                   ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config))  # fmt: skip
    torchrun = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2"]
    done = run([*torchrun, WORKER, str(out)], **env)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {p: [rank[p] for rank in ranks] for p in ("fp32", "bf16")}


def predicted(kind: str, method: str, precision: str) -> dict[str, int]:
    cfg = Config(method=method, precision=precision, **SMALL)
    sizes = {}
    if kind.startswith("zero"):
        sizes = {"reduce_bucket_size": HIDDEN**2, "prefetch_bucket_size": int(0.9 * HIDDEN**2),
                 "persistence_threshold": 10 * HIDDEN}  # fmt: skip
    pred = predict_sharded(
        cfg, load_arch_config(cfg.model), choose_runtime(cfg), Sharding(kind, 2, **sizes), False
    )
    return pred.components


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_held_per_process_equal_the_prediction(kind, tmp_path):
    if kind.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed not installed")
    measured = launch(kind, tmp_path)
    for precision, ranks in measured.items():
        for method in ("full", "lora"):
            pred = predicted(kind, method, precision)
            keys = [*HELD, "communication"] if kind == "ddp" else HELD
            for key in keys:
                most = max(rank[method].get(key, 0) for rank in ranks)  # the fuller process
                print(kind, precision, method, key, "measured", most, "predicted", pred[key])
                assert most == pred[key], (precision, method, key, most, pred[key])


def test_plan_cli_predicts_per_process_and_refuses_bad_values_in_one_line(capsys):
    argv = ["plan", "--model", "qwen2.5-0.5b", "--methods", "full", "--json"]
    assert main(argv) == 0
    one = json.loads(capsys.readouterr().out)
    assert "sharding" not in one  # one process: as before
    assert main([*argv, "--processes", "8", "--sharding", "zero3"]) == 0
    zero3 = json.loads(capsys.readouterr().out)
    assert zero3["sharding"]["processes"] == 8 and "ZeRO-3" in zero3["sharding"]["sharded"]
    whole, part = (r["arms"]["full"]["prediction"]["components_gib"] for r in (one, zero3))
    assert part["optimizer"] == pytest.approx(whole["optimizer"] / 8, rel=1e-3)
    assert main([*argv, "--processes", "2"]) == 0  # N > 1 alone: DDP
    assert json.loads(capsys.readouterr().out)["sharding"]["kind"] == "ddp"
    for bad, message in [
        (["--processes", "0"], "--processes 0"),
        (["--processes", "two"], "--processes two"),
        (["--processes", "2", "--sharding", "zero4"], "--sharding zero4"),
        (["--sharding", "fsdp2"], "--processes 2 or more"),
        (["--processes", "2", "--sharding", "zero2", "optimizer=adamw_lean"], "DeepSpeed"),
    ]:
        assert main([*argv, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
