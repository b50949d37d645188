"""Fault injection: bad input, two runs at once, a corrupt cache, a full disk, a cut
artifact, a crash while a finished stage is moved into place.

Every bad input must end with exit status 2 and one line on stderr (``error: ...``), no
traceback, and nothing written: the contract of docs/reliability.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cai.cli import main

GOOD_CONSTITUTION = "builtin:default"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line_error(capsys, argv, root: Path, match: str | None = None) -> str:
    """Run the CLI in-process; assert exit 2, one `error:` line, no traceback, nothing written."""
    before = _tree(root)
    rc = main(argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc == 2, (rc, out.out[-500:], out.err[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    assert _tree(root) == before, "a bad input wrote something"
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


# -- bad config values and settings (each through `cai validate` and `cai run`) ---------------

BAD_SETTINGS = [
    ("critique_revision.temperature=-1", "critique_revision.temperature' must be >= 0"),
    ("critique_revision.max_new_tokens=0", "critique_revision.max_new_tokens' must be >= 1"),
    ("critique_revision.rounds=-2", "critique_revision.rounds' must be >= 0"),
    ("critique_revision.top_p=0", "critique_revision.top_p' must be in (0, 1]"),
    ("data.max_per_split=-5", "data.max_per_split' must be >= 1"),
    ("data.max_per_split=0", "data.max_per_split' must be >= 1"),
    ("data.test_fraction=1", "data.test_fraction' must be in [0, 1)"),
    ("engine.batch_size=-4", "engine.batch_size' must be >= 1"),
    ("engine.score_batch_size=0", "engine.score_batch_size' must be >= 1"),
    ("feedback.top_p=1.5", "feedback.top_p' must be in (0, 1]"),
    ("feedback.samples_per_prompt=1", "feedback.samples_per_prompt"),
    ("feedback.cot_clamp=[0.7, 0.9]", "feedback.cot_clamp"),
    ("feedback.few_shot=-3", "feedback.few_shot' must be >= -1"),
    ("rl.kl_coef=-1", "rl.kl_coef' must be >= 0"),
    ("rl.temperature=0", "rl.temperature"),
    ("dpo.beta=0", "dpo.beta' must be > 0"),
    ("dpo.min_confidence=2", "dpo.min_confidence' must be in [0, 1]"),
    ("sft.learning_rate=0", "sft.learning_rate' must be > 0"),
    ("sft.epochs=-1", "sft.epochs' must be > 0"),
    ("sft.lora_dropout=1.5", "sft.lora_dropout' must be in [0, 1]"),
    ("preference_model.batch_size=0", "preference_model.batch_size' must be >= 1"),
    ("evaluate.bootstrap=-1", "evaluate.bootstrap' must be >= 0"),
    ("rl.advantage=ppo", "rl.advantage' must be one of rloo, grpo"),
    ("evaluate.revision_splits=[test, dev]", "evaluate.revision_splits': bad or repeated split 'dev'"),
    ("evaluate.revision_splits=[test, test]", "evaluate.revision_splits': bad or repeated split 'test'"),
    ("evaluate.revision_max_chains=0", "evaluate.revision_max_chains' must be >= 1"),
    ("stages=[prepare, nosuch]", "unknown stage 'nosuch'"),
    ("engine.kind=vllm", "engine.kind' must be one of"),
    ("engine.modle=x", "unknown key 'engine.modle'"),
    ("engine.batch_size=abc", "engine.batch_size' expects an integer"),
    ("seed=1.5", "'seed' expects an integer"),
    ("engine.batch_size", "is not KEY=VALUE"),
    ("engine.model=/does/not/exist", "'engine.model': '/does/not/exist' does not exist"),
    ("engine.model=not a model!", "is not a hub id"),
    ("dpo.policy=/nope/dir", "'dpo.policy': '/nope/dir' does not exist"),
    ("engine.kind=openai", "engine.endpoints' is empty"),
    ("engine.wait_for_endpoints_s=-1", "engine.wait_for_endpoints_s' must be >= 0"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("setting,match", BAD_SETTINGS, ids=[b[0] for b in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_before_anything_runs(command, setting, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, [command, f"run_dir={tmp_path / 'run'}", setting], tmp_path, match)


def test_a_hub_model_not_cached_offline_stops_a_run_and_is_a_warning_in_the_pre_flight(tmp_path, monkeypatch,
                                                                                      capsys):
    """`cai run` cannot load it here: one line. `cai validate` may run on a login node whose cache is
    not the GPU nodes': it says it cannot check, and --strict makes that an error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    setting = "engine.model=nobody/not-in-the-cache"
    _one_line_error(capsys, ["run", f"run_dir={tmp_path / 'run'}", setting], tmp_path,
                    "not in the local Hugging Face cache")
    assert main(["validate", f"run_dir={tmp_path / 'run'}", setting]) == 0
    assert "warn: models: cannot check engine.model=nobody/not-in-the-cache" in capsys.readouterr().out
    _one_line_error(capsys, ["validate", f"run_dir={tmp_path / 'run'}", setting, "--strict"], tmp_path,
                    "cannot check engine.model=nobody/not-in-the-cache")


ENDPOINTS = [
    ("http://127.0.0.1:8000/v1?token=SECRET", "query string"),
    ("http://user:SECRET@127.0.0.1:8000/v1", "user or password"),
    ("ftp://user:SECRET@127.0.0.1/v1", "is not an http:// or https:// URL"),
]


@pytest.mark.parametrize("url,match", ENDPOINTS, ids=["query-token", "userinfo", "ftp"])
def test_a_bad_endpoint_is_rejected_and_its_secret_never_printed_or_written(url, match, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(capsys, ["run", f"run_dir={tmp_path / 'run'}", "engine.kind=openai",
                                    f'engine.endpoints=["{url}"]', "sft.model=default"], tmp_path, match)
    assert "SECRET" not in line  # nor written anywhere: nothing is (checked above)


def test_a_run_dir_that_is_a_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file\n")
    for command in ("validate", "run"):
        _one_line_error(capsys, [command, "run_dir=taken"], tmp_path, "is a file, not a folder")


def test_a_model_folder_without_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_model").mkdir()
    _one_line_error(capsys, ["validate", f"sft.model={tmp_path / 'empty_model'}"], tmp_path, "has no config.json")


# -- bad files -------------------------------------------------------------------------------

NOT_UTF8 = b"\xff\xfe\x00bad \xc3\x28 bytes\n"


def _files(tmp: Path) -> dict[str, Path]:
    d = tmp / "inputs"
    d.mkdir()
    (d / "config_latin1.yaml").write_bytes("seed: 0\nrun_dir: caf\xe9\n".encode("latin-1"))
    (d / "config_bad.yaml").write_text("seed: [0\n")
    (d / "config_list.yaml").write_text("- seed\n- 0\n")
    (d / "constitution_latin1.yaml").write_bytes(NOT_UTF8)
    (d / "constitution_empty.yaml").write_text("")
    (d / "constitution_bad.yaml").write_text("principles: [\n")
    (d / "constitution_noprinciples.yaml").write_text("name: x\nprinciples: []\n")
    (d / "prompts_latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    (d / "prompts_badline.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    (d / "prompts_empty.jsonl").write_text("")
    (d / "prompts_nocolumn.jsonl").write_text('{"title": "x"}\n')
    (d / "prompts_dupes.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    (d / "prompts.xyz").write_text("what\n")
    (d / "prompts_badrole.jsonl").write_text('{"messages": [{"role": "wizard", "content": "hi"}]}\n')
    (d / "prompts_two.jsonl").write_text('{"prompt": "only one"}\n')  # one split must be empty
    (d / "prompts_latin1.csv").write_bytes(b"prompt\ncaf\xe9\n")
    (d / "prompts_latin1.txt").write_bytes(b"caf\xe9\n")
    (d / "prompts_emptydir").mkdir()
    (d / "prompts_json_notlist.json").write_text('{"prompt": "x"}')
    # the users' own training files (sft.data, preference_model.data, dpo.data)
    pair = '{"prompt": "q", "chosen": "good", "rejected": "bad"}\n'
    (d / "pairs.csv").write_text("prompt,chosen,rejected\nq,good,bad\n")
    (d / "pairs_nofield.jsonl").write_text(pair + '{"prompt": "q", "chosen": "good"}\n')
    (d / "pairs_empty.jsonl").write_text(pair * 2 + '{"prompt": "q", "chosen": " ", "rejected": "bad"}\n')
    (d / "pairs_label.jsonl").write_text('{"prompt": "q", "chosen": "good", "rejected": "bad", "p_chosen": 1.5}\n')
    (d / "pairs_label.json").write_text(json.dumps([json.loads(pair), {**json.loads(pair), "p_chosen": "high"}]))
    (d / "pairs_noprompt.jsonl").write_text('{"chosen": "good", "rejected": "bad"}\n')
    (d / "pairs_empty_file.jsonl").write_text("")
    (d / "sft_content.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                         '{"role": "assistant", "content": 42}]}\n')
    (d / "sft_nocompletion.jsonl").write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q"}\n')
    (d / "sft_role.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}, '
                                      '{"role": "robot", "content": "a"}]}\n')
    (d / "sft_ends_with_user.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    (d / "pairs_emptydir").mkdir()
    return {p.name: p for p in d.iterdir()}


BAD_FILES = [
    (["--config", "{config_latin1.yaml}"], "is not UTF-8"),
    (["--config", "{config_bad.yaml}"], "not valid YAML"),
    (["--config", "{config_list.yaml}"], "expected a mapping"),
    (["--config", "missing.yaml"], "does not exist"),
    (["--config", "no-such-preset"], "no config file or preset named"),
    (["data.constitution={constitution_latin1.yaml}"], "is not UTF-8"),
    (["data.constitution={constitution_empty.yaml}"], "is empty"),
    (["data.constitution={constitution_bad.yaml}"], "constitution_bad.yaml"),
    (["data.constitution={constitution_noprinciples.yaml}"], "constitution_noprinciples.yaml"),
    (["data.constitution=missing.yaml"], "does not exist"),
    (["data.constitution=builtin:nope"], "no built-in constitution"),
    (["data.red_team={prompts_latin1.jsonl}"], "is not UTF-8"),
    (["data.red_team={prompts_badline.jsonl}"], "malformed JSON line"),
    (["data.red_team={prompts_empty.jsonl}"], "is empty"),
    (["data.helpful={prompts_nocolumn.jsonl}"], "no prompt column"),
    (["data.benign={prompts_dupes.jsonl}"], "duplicate prompt id"),
    (["data.red_team={prompts.xyz}"], "unknown prompt file format"),
    (["data.red_team={prompts_badrole.jsonl}"], "role must be"),
    (["data.red_team={prompts_two.jsonl}"], "split is empty"),
    (["data.helpful={prompts_latin1.csv}"], "is not UTF-8"),
    (["data.benign={prompts_latin1.txt}"], "is not UTF-8"),
    (["data.red_team={prompts_emptydir}"], "has no train/test files"),
    (["data.red_team={prompts_json_notlist.json}"], "expected a JSON list"),
    (["data.red_team=builtin:nope"], "no built-in prompt set"),
    (["stages=[sft]", "sft.data=/no/such/sft.jsonl"], "config field 'sft.data': '/no/such/sft.jsonl' does not exist"),
    (["stages=[dpo]", "dpo.data=feedbak", "dpo.policy=default"], "'feedbak' does not exist; give feedback, sl_prefs"),
    (["stages=[dpo]", "dpo.data=", "dpo.policy=default"], "config field 'dpo.data' is empty"),
    (["stages=[dpo]", "dpo.data=hf:Anthropic/hh-rlhf", "dpo.policy=default"], "hub datasets are not read here"),
    (["stages=[dpo]", "dpo.data={pairs.csv}", "dpo.policy=default"], "pairs.csv: unknown format '.csv' for dpo.data"),
    (["stages=[dpo]", "dpo.data={pairs_emptydir}", "dpo.policy=default"], "has no train/test files"),
    (["stages=[dpo]", "dpo.data={pairs_empty_file.jsonl}", "dpo.policy=default"], "pairs_empty_file.jsonl: no rows"),
    (["stages=[preference_model]", "preference_model.data={pairs_nofield.jsonl}", "preference_model.model=default"],
     "pairs_nofield.jsonl:2 (preference_model.data): no field 'rejected'"),
    (["preference_model.data={pairs_empty.jsonl}"],
     "pairs_empty.jsonl:3 (preference_model.data): field 'chosen' is empty"),
    (["dpo.data={pairs_label.jsonl}"],
     "pairs_label.jsonl:1 (dpo.data): field 'p_chosen' is 1.5; give a number in [0, 1]"),
    (["dpo.data={pairs_label.json}"], "pairs_label.json[1] (dpo.data): field 'p_chosen' is 'high'"),
    (["dpo.data={pairs_noprompt.jsonl}"], "pairs_noprompt.jsonl:1 (dpo.data): no field 'prompt'"),
    (["feedback.human_preferences={pairs_nofield.jsonl}"],
     "pairs_nofield.jsonl:2 (feedback.human_preferences): no field 'rejected'"),
    (["stages=[sft]", "sft.data={sft_content.jsonl}"],
     "sft_content.jsonl:1 (sft.data): field 'messages[1].content' must be a string"),
    (["stages=[sft]", "sft.data={sft_nocompletion.jsonl}"], "sft_nocompletion.jsonl:2 (sft.data): no field 'completion'"),
    (["stages=[sft]", "sft.data={sft_role.jsonl}"],
     "sft_role.jsonl:1 (sft.data): field 'messages[1].role' must be system, user"),
    (["stages=[sft]", "sft.data={sft_ends_with_user.jsonl}"], "field 'messages' must end with an assistant answer"),
]


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("args,match", BAD_FILES, ids=[" ".join(b[0]) for b in BAD_FILES])
def test_a_bad_input_file_is_one_line_naming_it(command, args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    def fill(arg: str) -> str:
        for name, path in files.items():
            arg = arg.replace("{" + name + "}", str(path))
        return arg

    argv = [command, f"run_dir={tmp_path / 'run'}"] + [fill(a) for a in args]
    _one_line_error(capsys, argv, tmp_path, match)


def test_validate_checks_single_files_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    _one_line_error(capsys, ["validate", "--constitution", str(files["constitution_latin1.yaml"])], tmp_path,
                    "is not UTF-8")
    _one_line_error(capsys, ["validate", "--prompts", str(files["prompts_badline.jsonl"])], tmp_path,
                    "malformed JSON line")


def test_the_real_command_exits_2_with_one_line(tmp_path):
    """The console entry point, not just main(): status 2 and one line on stderr."""
    out = subprocess.run([sys.executable, "-m", "cai", "validate", "critique_revision.temperature=-1"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: config field 'critique_revision.temperature' must be >= 0; got -1.0"]
    assert list(tmp_path.iterdir()) == []


def test_overrides_may_come_after_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "seed=3", "--config", "cpu-tiny", "data.max_per_split=2"]) == 0
    text = capsys.readouterr().out
    assert "seed: 3" in text and "max_per_split: 2" in text


# -- faults at run time, on a tiny model ------------------------------------------------------

SMALL = ["stages=[prepare, critique_revision]", "data.max_per_split=4", "critique_revision.rounds=1",
         "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=6", "engine.batch_size=4"]


def _runtime_error(err: str, match: str) -> str:
    """The one error line of a run that failed at run time (progress bars may precede it)."""
    assert "Traceback" not in err
    errors = [line for line in re.split(r"[\r\n]+", err) if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], err[-1500:]
    assert err.rstrip().endswith(errors[0])
    return errors[0]


def _run(tmp_path, tiny_model, *extra, check=True):
    argv = ["run", f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", *SMALL, *extra]
    return main(argv)


def test_a_corrupt_request_cache_is_one_line_and_finished_stages_survive(tmp_path, tiny_model, capsys):
    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0
    capsys.readouterr()
    prepared = _tree(tmp_path / "run" / "prepare")
    (tmp_path / "run" / "cache.sqlite").write_bytes(b"this is not a database at all " * 40)
    rc = _run(tmp_path, tiny_model)
    line = _runtime_error(capsys.readouterr().err, "not a readable request cache")
    assert rc == 2 and "mv cache.sqlite cache.sqlite.bad" in line
    assert _tree(tmp_path / "run" / "prepare") == prepared
    # The way out the message names works.
    os.replace(tmp_path / "run" / "cache.sqlite", tmp_path / "run" / "cache.sqlite.bad")
    assert _run(tmp_path, tiny_model) == 0


def test_a_full_disk_is_one_line_and_nothing_finished_is_damaged(tmp_path, tiny_model, capsys, monkeypatch):
    """ENOSPC injected into the artifact writer while critique_revision writes its files."""
    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0
    capsys.readouterr()
    prepared = {p: p.read_bytes() for p in (tmp_path / "run" / "prepare").rglob("*") if p.is_file()}
    import cai.io

    real = cai.io._atomic

    def full(path, write):
        if "critique_revision" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, write)

    monkeypatch.setattr(cai.io, "_atomic", full)
    rc = _run(tmp_path, tiny_model)
    _runtime_error(capsys.readouterr().err, "no space left on the device")
    assert rc == 2
    assert not (tmp_path / "run" / "critique_revision").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "run" / "prepare").rglob("*") if p.is_file()} == prepared
    monkeypatch.setattr(cai.io, "_atomic", real)
    assert _run(tmp_path, tiny_model) == 0  # space is back: the same command finishes
    assert (tmp_path / "run" / "critique_revision" / "manifest.json").is_file()


def test_a_failed_write_leaves_the_old_file_whole(tmp_path):
    from cai.io import write_jsonl

    path = tmp_path / "a.jsonl"
    write_jsonl(path, [{"n": 1}, {"n": 2}])

    def rows():
        yield {"n": 3}
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_jsonl(path, rows())
    assert path.read_text() == '{"n": 1}\n{"n": 2}\n'
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_cut_artifact_is_caught_before_the_next_stage_reads_it(tmp_path, tiny_model, capsys):
    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0
    capsys.readouterr()
    split = tmp_path / "run" / "prepare" / "prompts" / "red_team" / "train.jsonl"
    split.write_text(split.read_text().splitlines()[0] + "\n")  # cut to one line
    rc = _run(tmp_path, tiny_model)
    line = _runtime_error(capsys.readouterr().err, str(split))
    assert rc == 2 and "stage 'prepare'" in line and "delete" in line
    assert not (tmp_path / "run" / "critique_revision").exists()


def test_the_report_checks_what_it_reads(tmp_path, tiny_model, capsys):
    assert _run(tmp_path, tiny_model) == 0
    capsys.readouterr()
    chains = tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl"
    chains.write_bytes(chains.read_bytes()[:-4] + b"\xff\xfe}\n")  # same length, bad bytes
    for argv in (["report", str(tmp_path / "run")], ["report", str(tmp_path / "run"), "--out", str(tmp_path / "r.html")]):
        rc = main(argv)
        _runtime_error(capsys.readouterr().err, "content changed")
        assert rc == 2
    assert not (tmp_path / "r.html").exists()


def test_a_second_run_on_the_same_folder_is_refused_naming_the_first(tmp_path, tiny_model, capsys):
    from cai.runlock import RunLock

    (tmp_path / "run").mkdir()
    holder = RunLock(tmp_path / "run")
    holder.acquire()
    try:
        rc = _run(tmp_path, tiny_model)
        line = _runtime_error(capsys.readouterr().err, "in use by another cai run")
        assert rc == 2 and f"pid {os.getpid()}" in line
        assert not (tmp_path / "run" / "prepare").exists()
    finally:
        holder.release()
    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0  # released: the next run goes ahead


def test_two_concurrent_runs_one_refused_and_the_other_whole(tmp_path, tiny_model):
    """Two real processes on one run directory: exactly one runs; its artifacts are whole."""
    cmd = [sys.executable, "-m", "cai", "run", f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", *SMALL]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [o[1][-800:] for o in outs]
    refused = next(o for p, o in zip(procs, outs) if p.returncode == 2)
    _runtime_error(refused[1], "in use by another cai run (pid")
    chains = [json.loads(line) for s in ("train", "test")
              for line in (tmp_path / "run" / "critique_revision" / "chains" / f"{s}.jsonl").read_text().splitlines()]
    assert len(chains) == len({c["id"] for c in chains}) == 8 and all(len(c["rounds"]) == 1 for c in chains)


def test_a_stale_lock_from_a_killed_run_blocks_nobody(tmp_path, tiny_model):
    """The lock is the OS's: a process killed with -9 holds nothing afterwards."""
    (tmp_path / "run").mkdir()
    code = ("import sys, time; from cai.runlock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    assert json.loads((tmp_path / "run" / ".cai.lock").read_text())["pid"] == proc.pid  # the file is still there
    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0


@pytest.mark.parametrize("crash_after", ["set_aside", "renamed"])
def test_a_crash_while_a_finished_stage_moves_into_place_loses_nothing(crash_after, tmp_path, tiny_model, capsys,
                                                                       monkeypatch):
    """The old window: the stamp was deleted before the old folder was removed and the new
    one renamed, so a crash there made the next run discard a finished stage."""
    import cai.pipeline

    assert _run(tmp_path, tiny_model, "stages=[prepare]") == 0
    real_replace = os.replace
    calls = []

    def crashing(src, dst):
        calls.append((str(src), str(dst)))
        real_replace(src, dst)
        if str(src).endswith("critique_revision.partial") and crash_after == "renamed":
            raise SystemExit("crash")
        if str(dst).endswith("critique_revision.old") and crash_after == "set_aside":
            raise SystemExit("crash")

    # A first finished critique_revision, then a config change that reruns it and crashes mid-move.
    assert _run(tmp_path, tiny_model) == 0
    first = (tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl").read_text()
    monkeypatch.setattr(cai.pipeline.os, "replace", crashing)
    with pytest.raises(SystemExit):
        _run(tmp_path, tiny_model, "critique_revision.max_new_tokens=9")
    monkeypatch.setattr(cai.pipeline.os, "replace", real_replace)
    capsys.readouterr()
    # The next run with the same config finds the finished work instead of redoing it.
    assert _run(tmp_path, tiny_model, "critique_revision.max_new_tokens=9") == 0
    out = capsys.readouterr().out
    assert "already finished" in out and "[critique_revision] running" not in out
    second = (tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl").read_text()
    assert second != first
    assert not (tmp_path / "run" / "critique_revision.old").exists()
    assert not (tmp_path / "run" / "critique_revision.partial").exists()


# -- mistakes that passed silently, crashed, or were said twice (the cluster pre-flight) --------
#
# Each case below failed on the code before the pre-flight work: the mistake passed (exit 0),
# a traceback came out, something was written, the message was printed twice, or (the
# byte-order marks and the plans) a valid input was refused.

_CONSTITUTION_YAML = (Path(__file__).resolve().parents[1] / "src/cai/data/constitutions/default.yaml")


def _mistake_files(tmp: Path) -> dict[str, Path]:
    import csv

    d = tmp / "mistakes"
    d.mkdir()
    (d / "config_dup_top.yaml").write_text("seed: 1\nstages: [prepare]\nseed: 2\n")
    (d / "config_dup_nested.yaml").write_text("engine:\n  batch_size: 4\n  device: cpu\n  batch_size: 8\n")
    text = _CONSTITUTION_YAML.read_text(encoding="utf-8")
    (d / "constitution_dup.yaml").write_text(text + "\nname: another-name\n", encoding="utf-8")
    (d / "constitution_dup_principle.yaml").write_text(
        "name: tiny\nprinciples:\n  - id: a\n    critique: Is it harmful?\n    critique: Is it rude?\n"
        "    revision: Rewrite it.\n", encoding="utf-8")
    import yaml as _yaml

    as_json = json.dumps(_yaml.safe_load(text))
    (d / "constitution_dup.json").write_text('{"name": "first", ' + as_json[1:], encoding="utf-8")
    (d / "constitution_bom.json").write_text(as_json, encoding="utf-8-sig")
    (d / "constitution_bom.yaml").write_text(text, encoding="utf-8-sig")
    (d / "one_prompt.jsonl").write_text('{"prompt": "only one"}\n')
    prompts = [f"a question number {i} about gardens" for i in range(12)]
    (d / "bom.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8-sig")
    (d / "bom.json").write_text(json.dumps([{"prompt": p} for p in prompts]), encoding="utf-8-sig")
    (d / "bom.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8-sig")
    with open(d / "bom.csv", "w", newline="", encoding="utf-8-sig") as fh:
        csv.writer(fh).writerows([["prompt"]] + [[p] for p in prompts])
    (d / "bom_split").mkdir()
    for split, part in (("train", prompts[:8]), ("test", prompts[8:])):
        (d / "bom_split" / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in part),
                                                        encoding="utf-8-sig")
    (d / "xstest").mkdir()
    with open(d / "xstest" / "xstest_prompts.csv", "w", newline="", encoding="utf-8-sig") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "prompt", "type", "label", "focus", "note"])
        for i in range(8):
            w.writerow([i + 1, f"How do I stop a stuck program number {i}?", "homonyms", "safe", "stop", ""])
    (d / "a_file").write_text("not a folder\n")
    return {p.name: p for p in d.iterdir()}


def _fill(args: list[str], files: dict[str, Path]) -> list[str]:
    out = []
    for arg in args:
        for name, path in files.items():
            arg = arg.replace("{" + name + "}", str(path))
        out.append(arg)
    return out


def _said_once(capsys, argv, root: Path, match: str) -> None:
    """One `error:` line (exit 2, nothing written), and its message nowhere else: not on
    stdout, not twice."""
    rc = main(argv)
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert rc == 2, (rc, out.out[-800:], out.err[-800:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], out.err
    assert "Traceback" not in out.err + out.out
    assert match not in out.out, out.out  # said once
    assert not [p for p in root.rglob("*") if "run" in p.relative_to(root).parts[:1]], "a bad input wrote the run"


MISTAKES = [  # (args, what the one error line says, commands)
    (["--config", "{config_dup_top.yaml}"], "key 'seed' is given twice (lines 1 and 3)", ("validate", "run")),
    (["--config", "{config_dup_nested.yaml}"], "key 'batch_size' is given twice (lines 2 and 4)", ("validate", "run")),
    (["data.constitution={constitution_dup.yaml}"], "key 'name' is given twice", ("validate", "run")),
    (["data.constitution={constitution_dup_principle.yaml}"], "key 'critique' is given twice (lines 4 and 5)",
     ("validate", "run")),
    (["data.constitution={constitution_dup.json}"], "key 'name' is given twice", ("validate", "run")),
    (["evaluate.extra_models={a: default, a: default}"], "key 'a' is given twice", ("validate", "run")),
    (["run_dir={a_file}/inside"], "is a file, so", ("validate", "run")),
    (["run_dir=" + "x" * 300], "a folder name in it is 300 bytes long", ("validate", "run")),
    (["run_dir="], "'run_dir': '' is not a folder name", ("validate", "run")),
    (["stages=[prepare, prepare]"], "'prepare' is listed twice", ("validate", "run")),
    (["stages=[]"], "config field 'stages' is empty", ("validate", "run")),
    (["stages=[critique_revision, prepare]"], "critique_revision reads the output of prepare", ("validate", "run")),
    (["stages=[sft]"], "stage 'sft' needs stage 'critique_revision'", ("validate", "run")),
    (["engine.device=gpu"], "'engine.device' must be auto, cpu, cuda, cuda:N or mps", ("validate", "run")),
    (["evaluate.harmlessness_principle=no-such-principle"], "has no principle 'no-such-principle'", ("validate", "run")),
    (["evaluate.helpfulness_principle=no-such-principle"], "has no principle 'no-such-principle'", ("validate", "run")),
    (["feedback.human_preferences=/no/such/prefs.jsonl"], "'/no/such/prefs.jsonl' does not exist", ("validate", "run")),
    (["evaluate.extra_models={other: /no/such/model}"], "'/no/such/model' does not exist", ("validate", "run")),
    (["evaluate.anchors=[initial, nosuch]"], "'evaluate.anchors': no model 'nosuch' that can be evaluated",
     ("validate", "run")),
    (["data.constitution=/no/such/constitution.yaml"], "does not exist", ("run",)),
    (["data.red_team=/no/such/prompts.jsonl"], "does not exist", ("run",)),
    (["engine.device=cuda", "stages=[prepare, critique_revision]"], "no CUDA device is visible", ("run",)),
    (["--config", "gpu-vllm", "engine.device=auto", "stages=[prepare]"], "'sft.model': model 'Qwen/Qwen2.5-7B-Instruct' is not in the local",
     ("run",)),
]


# (validate warns, rather than fails, what it cannot check from here: a missing device, an uncached model)
MISTAKE_CASES = [(command, args, match) for args, match, commands in MISTAKES for command in commands]


@pytest.mark.parametrize("command,args,match", MISTAKE_CASES,
                         ids=[f"{c}-{' '.join(a)[:60]}" for c, a, _ in MISTAKE_CASES])
def test_a_mistake_that_used_to_pass_is_one_line_said_once(command, args, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = _mistake_files(tmp_path)
    argv = [command] + (["run_dir=run"] if not any(a.startswith("run_dir=") for a in args) else []) + _fill(args, files)
    _said_once(capsys, argv, tmp_path, match)


def test_a_run_dir_that_cannot_be_made_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "run_dir=/proc/cai-no-such/run", "stages=[prepare]"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and "/proc/cai-no-such" in err
    assert "Traceback" not in err


def test_validate_prompts_is_held_to_what_data_red_team_is(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = _mistake_files(tmp_path)
    _said_once(capsys, ["validate", "--prompts", str(files["one_prompt.jsonl"])], tmp_path, "split is empty")


def test_a_hub_that_cannot_be_reached_stops_a_run_at_once(tmp_path, monkeypatch, capsys):
    """HF_HUB_OFFLINE unset and no network: one line, no retries, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    _said_once(capsys, ["run", "run_dir=run", "engine.model=nobody/not-cached", "stages=[prepare]"], tmp_path,
               "the hub cannot be reached from here")


BOM_INPUTS = [
    ["data.red_team={bom.jsonl}"], ["data.red_team={bom.csv}"], ["data.red_team={bom.json}"],
    ["data.red_team={bom_split}"], ["data.constitution={constitution_bom.json}"],
    ["evaluate.sets=[eval:xstest:{xstest}]"],
]


@pytest.mark.parametrize("args", BOM_INPUTS, ids=[a[0] for a in BOM_INPUTS])
def test_a_file_with_a_byte_order_mark_is_read(args, tmp_path, monkeypatch, capsys):
    """Excel and Windows editors save UTF-8 with a byte-order mark; datasets and pandas read it."""
    monkeypatch.chdir(tmp_path)
    files = _mistake_files(tmp_path)
    rc = main(["validate", "run_dir=run"] + _fill(args, files))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "ok: constitution 'cai-default'" in out.out


def test_a_text_prompt_file_with_a_byte_order_mark_keeps_it_out_of_the_prompt(tmp_path, monkeypatch, tiny_model):
    from cai.config import load_config
    from cai.io import read_jsonl
    from cai.layout import RunFolder
    from cai.pipeline import run_pipeline

    monkeypatch.chdir(tmp_path)
    files = _mistake_files(tmp_path)
    run = run_pipeline(load_config(None, ["run_dir=run", f"engine.model={tiny_model}", "stages=[prepare]",
                                          f"data.red_team={files['bom.txt']}"]), log=lambda m: None)
    folder = RunFolder(run)
    texts = [r["prompt"] for s in ("train", "test")
             for r in read_jsonl(folder.path("prepare", "prompts", set="red_team", split=s))]
    assert len(texts) == 12 and not any(t.startswith("\ufeff") for t in texts)


def _config_only(tiny_model: str, dest: Path) -> Path:
    """A checkpoint folder with its config and tokenizer but no weights (a 7B user's login node)."""
    import shutil

    dest.mkdir()
    for f in Path(tiny_model).iterdir():
        if not f.name.endswith((".safetensors", ".bin")):
            shutil.copy(f, dest / f.name)
    return dest


def test_a_gpu_config_plans_on_a_cpu_machine(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    model = _config_only(tiny_model, tmp_path / "config-only")
    rc = main(["plan", "--no-calibrate", "--config", "gpu-vllm", f"sft.model={model}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "sft" in out.out and "no native bfloat16" not in out.err


def test_a_plan_without_weights_gives_memory_and_tokens_and_says_why(tmp_path, monkeypatch, capsys, tiny_model):
    monkeypatch.chdir(tmp_path)
    model = _config_only(tiny_model, tmp_path / "config-only")
    rc = main(["plan", f"engine.model={model}", "stages=[prepare, critique_revision, sft]"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "timing needs the weights" in out.out and "peak/proc" in out.out
