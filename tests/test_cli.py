"""The command line: --help of every subcommand, bad input as one-line errors with exit code 2,
and run directories that are never overwritten by accident."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tuneoff.cli import main

SUBCOMMANDS = ["compare", "train", "inspect", "report"]


@pytest.mark.parametrize("command", [[], *[[c] for c in SUBCOMMANDS]])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tuneoff" in capsys.readouterr().out


def test_console_script_help_is_fast_and_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "tuneoff", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(c in out for c in SUBCOMMANDS)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("tuneoff: error:")]
    assert len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture
def common(tiny_model_dir, tmp_path):
    return ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "run")]


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--preset", "nope"], "unknown preset"),
        (["--methods", "lora,dora"], "'methods'"),
        (["learning_rate=1"], "unknown config key 'learning_rate'"),
        (["epochs=zero"], "'epochs': expected int"),
        (["--config", "/nonexistent.yaml"], "not found"),
        (["--dataset", "/nonexistent/data.jsonl"], "not found"),
    ],
)
def test_bad_compare_input_is_a_one_line_error(extra, fragment, common, capsys, tmp_path):
    code, err = run_cli(["compare", *common, *extra], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()  # nothing written for a bad command


def test_bad_method_is_a_one_line_error(common, capsys):
    code, err = run_cli(["train", "--method", "dora", *common], capsys)
    assert_one_line_error(code, err, "'method'")


def test_malformed_dataset_line_names_file_and_line(common, capsys, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "input": "", "output": "b"}\n{oops\n')
    code, err = run_cli(["compare", *common, "--dataset", str(path)], capsys)
    assert_one_line_error(code, err, f"{path} line 2")


def test_missing_columns(common, capsys, tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "a", "answer": "b"}]))
    code, err = run_cli(["compare", *common, "--dataset", str(path)], capsys)
    assert_one_line_error(code, err, "rename the columns")


def test_model_not_found_offline(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    code, err = run_cli(
        [
            "compare",
            "--model",
            "nobody/no-such-model-tuneoff",
            "--output-dir",
            str(tmp_path / "run"),
        ],
        capsys,
    )
    assert_one_line_error(code, err, "--model ./my-model")


def test_existing_directories_are_never_overwritten_silently(common, capsys, tmp_path):
    user_dir = tmp_path / "run"
    user_dir.mkdir()
    (user_dir / "precious.txt").write_text("mine")
    code, err = run_cli(["compare", *common], capsys)
    assert_one_line_error(code, err, "--overwrite")
    code, err = run_cli(["compare", *common, "--overwrite"], capsys)
    assert_one_line_error(code, err, "not a tuneoff run")
    assert (user_dir / "precious.txt").read_text() == "mine"


def test_inspect_of_a_non_run_is_a_one_line_error(capsys, tmp_path):
    code, err = run_cli(["inspect", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "not a tuneoff run")


def test_overrides_may_follow_options_and_unknown_options_stay_errors(capsys):
    def plan(*argv: str) -> dict:
        assert main(["plan", *argv]) == 0
        return json.loads(capsys.readouterr().out)

    default = plan("--preset", "tiny", "--json")
    before = plan("max_seq_len=96", "--preset", "tiny", "--json")
    after = plan("--preset", "tiny", "--json", "max_seq_len=96")
    assert after == before != default
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--preset", "tiny", "--no-such-flag", "max_seq_len=128"])
    assert exit_info.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["bench", "--model", "embedded:tiny-qwen2", "--seq-len", "0"], "--seq-len"),
        (["generate", "--model", "embedded:tiny-qwen2", "hi", "--temperature", "1",
          "--top-k", "-1"], "--top-k"),
        # NaN and infinity passed every range check (NaN compares false), then failed sampling
        (["generate", "--model", "embedded:tiny-qwen2", "hi", "--temperature", "nan"],
         "--temperature nan"),
        (["generate", "--model", "embedded:tiny-qwen2", "hi", "--temperature", "inf"],
         "--temperature inf"),
        (["generate", "--model", "embedded:tiny-qwen2", "hi", "--top-p", "nan"], "--top-p nan"),
        (["generate", "--model", "embedded:tiny-qwen2", "hi", "--temperature", "1",
          "--seed", str(10**23)], "--seed"),  # was torch's overflow
        # argv decodes a non-UTF-8 byte to a lone surrogate, which the tokenizer cannot take
        (["generate", "--model", "embedded:tiny-qwen2", "caf\udce9"], "byte 0xE9"),
        (["generate", "--model", "embedded:tiny-qwen2", "--system", "\udcff", "hi"],
         "--system is not valid Unicode"),
        (["generate", "--model", "embedded:tiny-qwen2", "--raw", ""], "the prompt is empty"),
        (["compare", "--config", "."], "is a directory"),
    ],
)  # fmt: skip
def test_out_of_range_options_are_one_line_errors(argv, fragment, capsys):
    code, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("errors", ["surrogateescape", "strict"])
def test_generate_refuses_stdin_that_is_not_utf8(errors, capsys, monkeypatch):
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\xfe"), encoding="utf-8", errors=errors)
    monkeypatch.setattr(sys, "stdin", stdin)
    code, err = run_cli(["generate", "--model", "embedded:tiny-qwen2", "-"], capsys)
    assert_one_line_error(code, err, "byte 0xFF" if errors == "surrogateescape" else "stdin")


def test_serve_port_out_of_range_is_a_one_line_error(capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    import tuneoff.engine

    monkeypatch.setattr(tuneoff.engine, "Engine", None)  # must fail before loading a model
    for port in ("99999", "-1"):
        code, err = run_cli(["serve", "--model", "embedded:tiny-qwen2", "--port", port], capsys)
        assert_one_line_error(code, err, "--port")


OUTPUT_DIR_OPTIONS = [
    ["merge", "runs/r1/lora", "--out"],
    ["bench", "--model", "embedded:tiny-qwen2", "--work-dir"],
]


@pytest.mark.parametrize("command", OUTPUT_DIR_OPTIONS, ids=["merge", "bench"])
@pytest.mark.parametrize("below", [False, True], ids=["file", "under-a-file"])
def test_output_dir_that_is_a_file_is_refused_and_kept(command, below, capsys, tmp_path):
    user_file = tmp_path / "userfile.txt"
    user_file.write_text("mine")
    out = user_file / "out" if below else user_file
    code, err = run_cli([*command, str(out)], capsys)
    assert_one_line_error(code, err, "is a file")
    assert user_file.read_text() == "mine"


def test_bench_work_dir_with_a_users_files_is_refused_and_kept(capsys, tmp_path):
    (tmp_path / "bench.json").write_text("mine")
    args = ["bench", "--model", "embedded:tiny-qwen2", "--work-dir", str(tmp_path)]
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "not a bench's")
    assert (tmp_path / "bench.json").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["compare", "full.seed=1"], "shared by every arm"),
        (["compare", "full.dataset=x.jsonl"], "shared by every arm"),
        (["compare", "lora.method=full"], "shared by every arm"),
        (["train", "--method", "lora", "full.lr=1e-4"], "not an arm here"),
        (["compare", "--resume", "--overwrite"], "pass one of them"),
    ],
)
def test_per_arm_overrides_that_cannot_apply_are_refused(argv, fragment, capsys, tmp_path):
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuneoff: error:") and fragment in err
    assert not (tmp_path / "run").exists()


def test_generate_refuses_a_prompt_beyond_the_context(capsys):
    long_prompt = " ".join(["word"] * 2000)  # the embedded model has 512 positions
    code, err = run_cli(["generate", "--model", "embedded:tiny-qwen2", long_prompt], capsys)
    assert_one_line_error(code, err, "context of 512")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_dir_that_cannot_be_created_is_one_line(capsys):
    """/proc takes no new directories, not even from root (os.access would say yes)."""
    args = ["train", "--method", "base", "--limit", "20", "--output-dir", "/proc/tuneoff/run"]
    code, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "cannot be created")
