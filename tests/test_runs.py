"""Run directories a user's input cannot damage: run names stay under runs/, a file is never
taken for a run directory, --overwrite deletes nothing before the run is known to be valid, and
a split whose every example is dropped is an error, not an empty run reported as ok."""

from __future__ import annotations

import json

import pytest

from tuneoff.cli import main

QUICK = ["--limit", "60", "--max-steps", "1", "--no-report", "gen_examples=0"]


def one_line_error(capsys, fragment: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tuneoff: error:")]
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["", "..", "../elsewhere", "a/b"])
def test_a_run_name_is_one_directory_under_runs(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--method", "base", "--name", name, *QUICK]) == 2
    one_line_error(capsys, "--output-dir")
    assert not any(tmp_path.rglob("tuneoff-run.json"))


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_file_is_not_taken_for_a_run_directory(below, capsys, tmp_path):
    user_file = tmp_path / "notes.txt"
    user_file.write_text("mine")
    for extra in ([], ["--overwrite"]):
        out = user_file / below if below else user_file
        code = main(["train", "--method", "lora", "--output-dir", str(out), *QUICK, *extra])
        assert code == 2
        one_line_error(capsys, "is a file")
    assert user_file.read_text() == "mine"


def test_overwrite_of_an_arm_checks_the_data_before_deleting_it(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--method", "lora", "--output-dir", str(run), *QUICK]) == 0
    capsys.readouterr()
    other = tmp_path / "other.jsonl"
    records = [{"instruction": f"say {i}", "output": str(i)} for i in range(60)]
    other.write_text("".join(json.dumps(r) + "\n" for r in records))
    args = ["train", "--method", "lora", "--output-dir", str(run), "--dataset", str(other)]
    assert main([*args, *QUICK, "--overwrite"]) == 2
    one_line_error(capsys, "other data settings")
    assert (run / "lora" / "summary.json").is_file()  # the arm is still there


def test_every_example_dropped_is_an_error_not_an_empty_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--output-dir", str(out), *QUICK,
                 "max_seq_len=8"]) == 2  # fmt: skip
    one_line_error(capsys, "raise max_seq_len")
    assert json.loads((out / "lora" / "summary.json").read_text())["status"] == "failed"


def test_max_seq_len_beyond_the_models_positions_is_an_error(capsys, tmp_path):
    out = tmp_path / "run"  # the embedded model has 512 positions
    assert main(["train", "--method", "lora", "--output-dir", str(out), *QUICK,
                 "max_seq_len=1024"]) == 2  # fmt: skip
    one_line_error(capsys, "max_seq_len <= 512")
    assert not out.exists()  # found from the config alone, before anything is written


def test_a_model_path_that_is_a_file_says_so(capsys, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text("[]")
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--model", str(data), "--output-dir", str(out),
                 *QUICK]) == 2  # fmt: skip
    one_line_error(capsys, "is a file")
    assert not out.exists()


def test_saved_weights_get_the_mode_of_every_other_file(tmp_path):
    """safetensors alone writes 0600 whatever the umask; a shared run must stay readable."""
    import os

    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--output-dir", str(out), *QUICK]) == 0
    umask = os.umask(0)
    os.umask(umask)
    files = list(out.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"adapter", "checkpoint"}
    assert {f.stat().st_mode & 0o777 for f in files} == {0o666 & ~umask}
