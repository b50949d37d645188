"""The command line: --help everywhere, one-line errors with non-zero exits."""

import subprocess
import sys

import pytest

from cai.cli import COMMANDS, main


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_works_for_every_command(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cai" in out
    if command in ("run", "validate", "config"):
        assert "engine.batch_size" in out  # the config fields are documented in --help


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "cai", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "validate" in out.stdout


def test_validate_ok_on_defaults_and_files(capsys):
    assert main(["validate"]) == 0
    out = capsys.readouterr().out
    assert "ok: constitution 'cai-default'" in out and "red_team: train=" in out
    assert main(["validate", "--constitution", "builtin:default", "--prompts", "builtin:benign"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["validate", "engine.batch_size=x"], "expects an integer"),
        (["validate", "--constitution", "missing.yaml"], "does not exist"),
        (["validate", "--prompts", "missing.jsonl"], "does not exist"),
        (["validate", "stages=[prepare, fly]"], "unknown stage 'fly'"),
        (["run", "--config", "nope"], "no config file or preset named 'nope'"),
        (["model", "no/such-model"], "not in the local Hugging Face cache"),
        (["model", "./no-such-dir"], "is not 'default', an existing directory"),
    ],
)
def test_errors_are_one_line_with_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1


def test_config_prints_resolved_yaml(capsys):
    assert main(["config", "engine.batch_size=3"]) == 0
    assert "batch_size: 3" in capsys.readouterr().out
    assert main(["config", "--presets"]) == 0
    assert "cpu-tiny" in capsys.readouterr().out
