"""`tuneoff report` on damaged run files (one-line errors, a truncated last metrics line skipped),
the confound list leaving out bookkeeping keys, and the processes row; from hand-written
summaries."""

from __future__ import annotations

import json
import logging

import pytest

from tuneoff.cli import main
from tuneoff.report import confounds, load_metrics


def arm(method: str, **config) -> dict:
    return {"status": "ok", "config": {"method": method, "lr": 1e-4, **config}, "runtime": {},
            "versions": {"torch": "2"}, "data": {}, "git_sha": "abc"}  # fmt: skip


def write_run(run, **arms) -> None:
    for name, text in arms.items():
        (run / name).mkdir(parents=True)
        (run / name / "summary.json").write_text(text)


@pytest.mark.parametrize("bad", [b"{bad", b"[]", b"\xff\xfe"])
def test_corrupt_summary_is_a_one_line_error_naming_file_and_fix(bad, tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, lora=json.dumps(arm("lora")), full="")
    (run / "full" / "summary.json").write_bytes(bad)
    (run / "report.md").write_text("earlier report")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(run / "full" / "summary.json") in err and "--method full" in err
    assert "--overwrite" in err
    assert (run / "report.md").read_text() == "earlier report"  # nothing replaced


def test_truncated_last_metrics_line_is_skipped_any_other_bad_line_is_an_error(tmp_path, caplog):
    rows = [{"event": "train", "step": s, "loss": 1.0 / s} for s in (1, 2)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "metrics.jsonl").write_text(text + '{"event": "tr')  # a killed run
    with caplog.at_level(logging.WARNING):
        assert load_metrics(tmp_path) == rows
    assert "truncated" in caplog.text
    (tmp_path / "metrics.jsonl").write_text(text + "{oops\n" + text)
    with pytest.raises(ValueError, match="metrics.jsonl line 3"):
        load_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(text + '{"event": "train"}\n' + text)  # no step
    with pytest.raises(ValueError, match="metrics.jsonl line 3"):
        load_metrics(tmp_path)


def test_report_of_a_run_with_a_truncated_metrics_line(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, lora=json.dumps(arm("lora")))
    (run / "lora" / "metrics.jsonl").write_text('{"event": "train", "step": 1, "loss": 2.0}\n{"ev')
    assert main(["report", str(run)]) == 0
    assert (run / "loss_curves.png").is_file()


def test_name_methods_and_output_dir_are_not_confounds():
    """An arm added with `tuneoff train` to a `compare` run differs in these keys only."""
    lora = arm("lora", name="flow", methods=["lora"], output_dir=None)
    full = arm("full", name="tiny-2025", methods=["lora", "full"], output_dir="runs/flow", lr=2e-5)
    rows = {key: expected for key, _, expected in confounds({"lora": lora, "full": full})}
    assert rows == {"config.method": True, "config.lr": False}


def test_the_report_says_how_many_processes_trained_each_arm_only_when_several_did():
    from tuneoff.report import resources_rows

    one = {"lora": arm("lora"), "full": arm("full")}
    assert not any(r[0] == "Processes" for r in resources_rows(one))
    several = {**one, "full": {**arm("full"), "runtime": {"world_size": 2, "distributed": "fsdp2"}}}
    rows = {r[0]: r[1:] for r in resources_rows(several)}
    assert rows["Processes"] == ["1", "2 (fsdp2; memory is one process's)"]


def test_an_arm_without_its_summary_is_named_not_silently_left_out(tmp_path, caplog):
    run = tmp_path / "run"
    write_run(run, lora=json.dumps(arm("lora")))
    (run / "full").mkdir()  # killed before it wrote summary.json
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(run)]) == 0
    assert "full: no summary.json" in (run / "report.md").read_text()
    assert "report leaves out full" in caplog.text
