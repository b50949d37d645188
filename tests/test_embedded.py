"""End-to-end on the embedded SmolLM2-135M-Instruct (slow: converts and runs the real model)."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    # Reuse the user's converted checkpoint if present; otherwise convert into a temp dir.
    return os.environ.get("CAI_TEST_MODEL_CACHE") or str(tmp_path_factory.mktemp("cai-cache"))


def test_cai_run_on_the_embedded_default(tmp_path, shared_cache):
    env = {**os.environ, "CAI_CACHE_DIR": shared_cache, "HF_HUB_OFFLINE": "1"}
    # Every stage of the cpu-tiny preset, shrunk so the test takes minutes, not a full run.
    cmd = [sys.executable, "-m", "cai", "run", f"run_dir={tmp_path / 'run'}",
           "critique_revision.max_prompts=3", "critique_revision.max_new_tokens=32",
           "critique_revision.critique_max_new_tokens=24", "sft.max_steps=2", "sft.batch_size=2",
           "feedback.max_prompts=2", "feedback.max_new_tokens=16", "preference_model.max_steps=1",
           "rl.steps=1", "rl.prompts_per_step=1", "rl.samples_per_prompt=2", "rl.max_new_tokens=8",
           "rl.eval_prompts=2", "dpo.max_steps=1", "evaluate.max_prompts=2", "evaluate.max_new_tokens=16",
           "evaluate.bootstrap=50"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    from cai.config import load_config

    stages = load_config("cpu-tiny").stages
    for stage in stages:
        assert (tmp_path / "run" / stage / "manifest.json").is_file(), stage
    assert (tmp_path / "run" / "report" / "index.html").is_file()
    assert out.stdout.splitlines()[-1].startswith("report: ") and "index.html" in out.stdout
    chains = (tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl").read_text().splitlines()
    assert len(chains) == 3
    # The SL-CAI model is an ordinary checkpoint the engine can load and generate from.
    from cai.engines.base import SamplingParams
    from cai.engines.local import LocalEngine

    sl = LocalEngine(str(tmp_path / "run" / "sft" / "model"))
    (answer,) = sl.generate([[{"role": "user", "content": "Say hello."}]], SamplingParams(max_new_tokens=8))
    assert answer[0].strip()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert again.stdout.count("already finished") == len(stages)


def test_embedded_model_answers_and_scores_sensibly(shared_cache, monkeypatch):
    monkeypatch.setenv("CAI_CACHE_DIR", shared_cache)
    from cai.engines.base import SamplingParams
    from cai.engines.local import LocalEngine
    from cai.models import resolve_model

    engine = LocalEngine(resolve_model("default"), batch_size=4)
    (answer,) = engine.generate(
        [[{"role": "user", "content": "What is the capital of France?"}]], SamplingParams(max_new_tokens=20)
    )
    assert "Paris" in answer[0]
    q = [{"role": "user", "content": "Which word is a colour? (A) table (B) green"},
         {"role": "assistant", "content": "The answer is: ("}]
    (scores,) = engine.choice_logprobs([q], [["A", "B"]])
    assert all(s < 0 for s in scores)


def test_kill_once_in_every_stage_on_the_embedded_model(tmp_path, shared_cache):
    """kill -9 at a seeded point inside each stage in turn (each rerun resumes the run),
    then let it finish: every stage completes once, nothing is lost or duplicated."""
    import json
    import random
    import signal
    import time

    env = {**os.environ, "CAI_CACHE_DIR": shared_cache, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "cai", "run", f"run_dir={run}",
           "critique_revision.max_prompts=3", "critique_revision.max_new_tokens=24",
           "critique_revision.critique_max_new_tokens=16", "sft.max_steps=4", "sft.batch_size=1",
           "sft.checkpoint_every=1", "feedback.max_prompts=3", "feedback.max_new_tokens=12",
           "preference_model.max_steps=4", "preference_model.batch_size=1", "preference_model.checkpoint_every=1",
           "rl.steps=3", "rl.prompts_per_step=1", "rl.samples_per_prompt=2", "rl.max_new_tokens=8",
           "rl.eval_prompts=2", "rl.checkpoint_every=1", "dpo.max_steps=4", "dpo.batch_size=1",
           "dpo.checkpoint_every=1", "evaluate.max_prompts=2", "evaluate.max_new_tokens=12", "evaluate.bootstrap=20"]
    from cai.stage_names import DEFAULT_STAGES as STAGES  # the stages a default run has (not expand)

    rng = random.Random(13)
    killed = []
    for stage in STAGES:
        if (run / stage / "manifest.json").is_file():
            continue  # finished while we waited for the previous stage's kill point
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.time() + 900
        while time.time() < end and proc.poll() is None and not (run / f"{stage}.partial").exists():
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 3.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed.append(stage)
        proc.wait()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(killed) >= 5, killed  # most stages were really interrupted
    for stage in STAGES:
        assert (run / stage / "manifest.json").is_file(), stage
        assert not (run / f"{stage}.partial").exists() and not (run / f"{stage}.old").exists()
    chains = [json.loads(l) for s in ("train", "test")
              for l in (run / "critique_revision" / "chains" / f"{s}.jsonl").read_text().splitlines()]
    assert len(chains) == len({c["id"] for c in chains}) == 6
    comps = [json.loads(l) for s in ("train", "test")
             for l in (run / "feedback" / "comparisons" / f"{s}.jsonl").read_text().splitlines()]
    assert len(comps) == len({c["id"] for c in comps})
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    assert [s for s, _ in sft["loss"]] == list(range(1, sft["steps"] + 1))
    pm = json.loads((run / "preference_model" / "metrics.json").read_text())
    assert [s for s, _ in pm["loss_history"]] == list(range(1, pm["steps"] + 1))
    rl = json.loads((run / "rl" / "metrics.json").read_text())
    assert [h["step"] for h in rl["history"]] == [1, 2, 3]
    dpo = json.loads((run / "dpo" / "metrics.json").read_text())
    assert [h["step"] for h in dpo["history"]] == list(range(1, dpo["steps"] + 1))
    answers = [json.loads(l) for l in (run / "evaluate" / "answers" / "initial.jsonl").read_text().splitlines()]
    assert len(answers) == len({(a["set"], a["id"]) for a in answers})
    assert (run / "report" / "index.html").is_file()
