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
        (["validate", "stages=[prepare, fedback]"], "unknown stage 'fedback'; did you mean 'feedback'?"),
        (["validate", "sft.learnig_rate=1e-5"], "unknown key 'sft.learnig_rate'; did you mean 'sft.learning_rate'?"),
        (["validate", "egnine.model=x"], "unknown key 'egnine'; did you mean 'engine'?"),
        (["config", "sfft"], "no config section 'sfft'; did you mean 'sft'?"),
        (["config", "sft", "dpo"], "give one section name at a time"),
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


def test_config_prints_one_sections_fields_with_help_and_resolved_values(capsys):
    assert main(["config", "sft", "sft.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "sft.learning_rate = 2e-05" in out and "AdamW learning rate" in out
    assert "dpo." not in out and "engine.batch_size" not in out
    assert "resolved:\nsft:\n" in out and "epochs: 3" in out
    full = subprocess.run([sys.executable, "-m", "cai", "config", "--help"], capture_output=True, text=True, timeout=120)
    assert len(out.splitlines()) < len(full.stdout.splitlines()) / 5


def test_env_prints_versions_cpu_features_gpus_and_extras_without_secret_values(capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for key in ("- cai: ", "- python: ", "- torch: ", "- transformers: ", "- cpu flags: ", "- bfloat16 on cpu: ",
                "- extra peft: ", "- HF_HUB_OFFLINE: 1"):
        assert key in out, key
    assert "gpu" in out and "OPENAI_API_KEY" in out and "sk-secret-value" not in out


def test_a_closed_pipe_ends_output_quietly():
    proc = subprocess.Popen([sys.executable, "-m", "cai", "config", "--presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before cai writes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141) and "Traceback" not in err and "error:" not in err and "BrokenPipe" not in err
