"""Kill -9 in the middle of a real run, then rerun: nothing lost, duplicated or recomputed."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import cached_rows


def _start(tmp_path, tiny_model, *extra):
    cmd = [sys.executable, "-m", "cai", "run", f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}",
           "engine.batch_size=4", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return cmd, env, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


CR = ["stages=[prepare, critique_revision]", "critique_revision.rounds=2", "critique_revision.max_prompts=40",
      "critique_revision.max_new_tokens=24", "critique_revision.critique_max_new_tokens=16"]


def test_kill_during_critique_revision_then_resume(tmp_path, tiny_model):
    cache = tmp_path / "run" / "cache.sqlite"
    cmd, env, proc = _start(tmp_path, tiny_model, *CR)
    reached = _wait_for(lambda: cached_rows(cache) >= 64, proc)
    assert reached, "the run finished or stalled before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = cached_rows(cache)
    assert not (tmp_path / "run" / "critique_revision").exists()  # no half-written artifact
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("engine cache:"))
    hits = int(line.split()[2])
    assert hits == saved  # every request answered before the kill came from the cache
    chains = [json.loads(l) for s in ("train", "test")
              for l in (tmp_path / "run" / "critique_revision" / "chains" / f"{s}.jsonl").read_text().splitlines()]
    ids = [c["id"] for c in chains]
    assert len(ids) == 80 and len(set(ids)) == 80  # none lost, none duplicated
    assert all(len(c["rounds"]) == 2 for c in chains)


def test_kill_during_sft_then_resume_from_checkpoint(tmp_path, tiny_model):
    common = [*CR[:1], "stages=[prepare, critique_revision, sft]", "critique_revision.rounds=1",
              "critique_revision.max_prompts=30", "critique_revision.max_new_tokens=24",
              "sft.batch_size=1", "sft.checkpoint_every=2"]
    cmd, env, proc = _start(tmp_path, tiny_model, *common)
    state = tmp_path / "run" / "sft.partial" / "checkpoint" / "trainer_state.json"
    assert _wait_for(state.exists, proc), "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[critique_revision] already finished" in out.stdout
    assert "[sft] resuming from checkpoint at step" in out.stdout
    metrics = json.loads((tmp_path / "run" / "sft" / "metrics.json").read_text())
    assert [s for s, _ in metrics["loss"]] == list(range(1, metrics["steps"] + 1))


def test_kill_during_feedback_then_resume(tmp_path, tiny_model):
    extra = ["stages=[prepare, feedback]", f"feedback.policy={tiny_model}", "feedback.max_prompts=40",
             "feedback.max_new_tokens=12", "feedback.helpful_ratio=0.5"]
    cache = tmp_path / "run" / "cache.sqlite"
    cmd, env, proc = _start(tmp_path, tiny_model, *extra)
    # 120 answer requests first (80 red-team + 40 helpful prompts), then 2 label requests
    # per comparison: kill among the labels
    reached = _wait_for(lambda: cached_rows(cache) >= 184, proc)
    assert reached, "the run finished or stalled before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = cached_rows(cache)
    assert not (tmp_path / "run" / "feedback").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("engine cache:"))
    assert int(line.split()[2]) == saved and int(line.split()[4]) > 0
    comps = [json.loads(l) for s in ("train", "test")
             for l in (tmp_path / "run" / "feedback" / "comparisons" / f"{s}.jsonl").read_text().splitlines()]
    ids = [c["id"] for c in comps]
    assert len(ids) == 120 and len(set(ids)) == 120  # none lost, none duplicated
    labels = sum(2 for c in comps if c["status"] == "labelled")
    assert int(line.split()[4]) == 120 + labels - saved  # nothing answered before the kill was recomputed
    assert all(c["status"] in ("labelled", "identical") for c in comps)


def test_kill_during_rl_then_resume_from_checkpoint(tmp_path, tiny_model):
    extra = ["stages=[prepare, feedback, preference_model, rl]", f"feedback.policy={tiny_model}",
             f"preference_model.model={tiny_model}", "feedback.max_prompts=6", "feedback.max_new_tokens=6",
             f"rl.policy={tiny_model}", "rl.steps=24", "rl.prompts_per_step=2", "rl.max_new_tokens=16",
             "rl.eval_prompts=2", "rl.checkpoint_every=2"]
    cmd, env, proc = _start(tmp_path, tiny_model, *extra)
    state = tmp_path / "run" / "rl.partial" / "checkpoint" / "trainer_state.json"
    assert _wait_for(state.exists, proc), "no checkpoint appeared before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "rl").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[preference_model] already finished" in out.stdout
    assert "[rl] resuming from checkpoint at step" in out.stdout
    metrics = json.loads((tmp_path / "run" / "rl" / "metrics.json").read_text())
    assert [h["step"] for h in metrics["history"]] == list(range(1, 25))  # none lost, none repeated
    rollouts = (tmp_path / "run" / "rl" / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in rollouts] == [s for s in range(1, 25) for _ in range(8)]


# -- the other stages: prepare, preference_model, dpo, evaluate, report --------------------------
#
# Each is killed at seeded points (a delay after the stage's folder appears), then rerun; the
# result must equal an uninterrupted run's, with every request answered before the kill
# taken from the cache.

import random  # noqa: E402

import pytest  # noqa: E402


def _artifacts(run, stage):
    """Every data file of a finished stage (JSON/JSONL/YAML), minus its timings."""
    out = {}
    for p in sorted((run / stage).rglob("*")):
        if p.suffix in (".jsonl", ".yaml") or (p.suffix == ".json" and p.name not in ("manifest.json", "metrics.json")):
            out[str(p.relative_to(run))] = p.read_text()
    return out


def _kill_at(tmp_path, tiny_model, extra, stage, seed, reference):
    cmd, env, proc = _start(tmp_path, tiny_model, *extra)
    partial = tmp_path / "run" / f"{stage}.partial"
    _wait_for(partial.exists, proc)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = cached_rows(tmp_path / "run" / "cache.sqlite")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "run"
    assert not (run / f"{stage}.partial").exists() and not (run / f"{stage}.old").exists()
    assert _artifacts(run, stage) == _artifacts(reference, stage)  # nothing lost, duplicated or changed
    line = next((l for l in out.stdout.splitlines() if l.startswith("engine cache:")), None)
    if line is not None:
        assert int(line.split()[2]) >= saved  # every answer cached before the kill was reused
    return out


def _reference(tmp_path_factory, tiny_model, extra):
    ref = tmp_path_factory.mktemp("reference")
    cmd, env, proc = _start(ref, tiny_model, *extra)
    proc.wait(timeout=600)
    assert proc.returncode == 0, proc.stdout.read()[-2000:]
    return ref / "run"


EVAL = ["stages=[prepare, evaluate]", "evaluate.max_new_tokens=8", "evaluate.bootstrap=10", "data.max_per_split=20"]
REPORT = ["stages=[prepare, critique_revision, report]", "critique_revision.rounds=1", "critique_revision.max_prompts=6",
          "critique_revision.max_new_tokens=8", "critique_revision.critique_max_new_tokens=6"]


@pytest.fixture(scope="module")
def eval_reference(tmp_path_factory, tiny_model):
    return _reference(tmp_path_factory, tiny_model, EVAL)


@pytest.mark.parametrize("stage,seed", [("prepare", 0), ("prepare", 3), ("prepare", 4),
                                        ("evaluate", 1), ("evaluate", 5), ("evaluate", 6)])
def test_kill_during_prepare_or_evaluate_then_resume(stage, seed, tmp_path, tiny_model, eval_reference):
    out = _kill_at(tmp_path, tiny_model, EVAL, stage, seed, eval_reference)
    assert _artifacts(tmp_path / "run", "prepare") == _artifacts(eval_reference, "prepare")
    assert "run finished" in out.stdout


@pytest.fixture(scope="module")
def report_reference(tmp_path_factory, tiny_model):
    return _reference(tmp_path_factory, tiny_model, REPORT)


@pytest.mark.parametrize("seed", [2, 7])
def test_kill_during_report_then_resume(seed, tmp_path, tiny_model, report_reference):
    _kill_at(tmp_path, tiny_model, REPORT, "report", seed, report_reference)
    assert (tmp_path / "run" / "report" / "index.html").stat().st_size > 1000


TRAIN = ["feedback.max_prompts=6", "feedback.max_new_tokens=6"]


@pytest.mark.parametrize("stage,seed", [("preference_model", None), ("dpo", None),
                                        ("preference_model", 8), ("dpo", 9)])
def test_kill_during_pm_or_dpo_training_then_resume_from_checkpoint(stage, seed, tmp_path, tiny_model):
    """seed None: killed just after the first checkpoint appears; else at a seeded delay
    after the stage starts (before or after a checkpoint)."""
    extra = [f"stages=[prepare, feedback, {stage}]", f"feedback.policy={tiny_model}", *TRAIN,
             f"{stage}.{'model' if stage == 'preference_model' else 'policy'}={tiny_model}",
             f"{stage}.batch_size=1", f"{stage}.checkpoint_every=2"]
    cmd, env, proc = _start(tmp_path, tiny_model, *extra)
    if seed is None:
        checkpoint = tmp_path / "run" / f"{stage}.partial" / "checkpoint"
        assert _wait_for(checkpoint.is_dir, proc), "no checkpoint appeared before the run ended"
    else:
        assert _wait_for((tmp_path / "run" / f"{stage}.partial").exists, proc), "the stage never started"
        time.sleep(random.Random(seed).uniform(0.0, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "[feedback] already finished" in out.stdout
    if seed is None:
        assert f"[{stage}] resuming from checkpoint at step" in out.stdout
    metrics = json.loads((tmp_path / "run" / stage / "metrics.json").read_text())
    steps = [h[0] for h in metrics["loss_history"]] if stage == "preference_model" else [h["step"] for h in metrics["history"]]
    assert steps == list(range(1, metrics["steps"] + 1))  # none lost, none repeated
