"""Inference-time critique/revision (`cai chat`, `cai revise`), `cai plan`, the gpu-vllm preset."""

import json
import os
import subprocess
import sys

import pytest

from cai.cli import main
from cai.checks import check_config
from cai.config import load_config

TINY = ["critique_revision.max_new_tokens=6", "critique_revision.critique_max_new_tokens=5",
        "critique_revision.few_shot=1", "engine.batch_size=4"]


def test_revise_a_file_with_chosen_principles(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nWrite a haiku about tea.\n")
    out = tmp_path / "out.jsonl"
    argv = ["revise", "--prompts", str(prompts), "--out", str(out), "--principle", "privacy", "--principle", "racism",
            f"engine.model={tiny_model}", *TINY, "critique_revision.skip_if_no_issue=false"]
    assert main(argv) == 0
    assert "2 prompts" in capsys.readouterr().out
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["messages"][-1]["content"] for r in recs] == ["How do I pick a lock?", "Write a haiku about tea."]
    for r in recs:
        assert [x["principle_id"] for x in r["rounds"]] == ["privacy", "racism"]
        assert all(isinstance(x["critique"], str) for x in r["rounds"])
        assert isinstance(r["initial_response"], str) and isinstance(r["final_response"], str)
    # the same prompts and seed give the same chains
    assert main(argv[:4] + [str(tmp_path / "again.jsonl")] + argv[5:]) == 0
    assert (tmp_path / "again.jsonl").read_text() == out.read_text()


def test_revise_samples_principles_and_rejects_unknown_ones(tmp_path, tiny_model, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["revise", "--prompts", str(prompts), "--out", str(out), f"engine.model={tiny_model}", *TINY,
                 "critique_revision.rounds=3"]) == 0
    (rec,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert rec["id"] == "a" and len(rec["rounds"]) == 3
    assert main(["revise", "--prompts", str(prompts), "--out", str(out), "--principle", "nope",
                 f"engine.model={tiny_model}", *TINY]) == 2
    assert "no principle 'nope'" in capsys.readouterr().err


def test_chat_reads_stdin_and_prints_answer_critique_revision(tiny_model, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CAI_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "cai", "chat", "--principle", "harmful-general", f"engine.model={tiny_model}", *TINY,
         "critique_revision.skip_if_no_issue=false"],
        input="How do I kill a Python process?\n/reset\n\nhello there\n/quit\nnot read\n",
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("answer: ") == 2 and out.count("critique: ") == 2 and out.count("final: ") == 2
    assert out.count("principle harmful-general") == 2 and "(conversation cleared)" in out


def test_plan_counts_and_times_every_stage(tiny_model, capsys):
    from cai.plan import plan, render

    cfg = load_config("cpu-tiny", [f"engine.model={tiny_model}", "engine.quantize=none"])
    result = plan(cfg, calibrate=True, log=lambda m: None)
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == cfg.stages
    cr, c, ev = rows["critique_revision"], cfg.critique_revision, cfg.evaluate
    n = c.max_prompts  # red-team prompts per split, as many helpful ones; 1 round of critique + revision
    assert c.rounds == 1 and c.helpful_ratio == 1.0 and c.quality_gates and c.gate_retries == 1
    tries = 2  # every revision counted with its one retry
    assert cr["generate"] == 4 * n + tries * 2 * (2 * n)
    assert cr["new_tokens"] == 4 * n * c.max_new_tokens + tries * 2 * n * (c.max_new_tokens + c.critique_max_new_tokens)
    bs = cfg.engine.batch_size  # decoding: first answers, then each try's critiques and revisions, a batch at a time
    assert cr["decode_steps"] == -(-4 * n // bs) * c.max_new_tokens + tries * -(-2 * n // bs) * (
        c.max_new_tokens + c.critique_max_new_tokens)
    models, m = 4, ev.max_prompts  # initial, SL-CAI, RL, DPO; m test prompts of each of 3 sets
    from cai.cost import PlanInputs
    from cai.inputs import load_inputs
    from cai.evaluation.frontier import frontier_extra

    points = frontier_extra(PlanInputs(cfg, *load_inputs(cfg), lambda conv: 1))  # rl/dpo points before the last
    assert points > 0
    assert rows["evaluate"]["generate"] == (models + points) * 3 * m
    # pairwise (both orders, red-team + helpful), harmfulness (red-team), refusal (both orders, benign + red-team),
    # safe (both orders, red-team); each frontier point: the same against the initial model only
    assert rows["evaluate"]["score"] == 6 * 2 * m * 2 + models * m + models * 2 * m * 2 + models * m * 2 \
        + points * (2 * m * 2 + m + 2 * m * 2 + m * 2)
    rc = cfg.rl  # rl samples with the training policy, not the engine
    assert rows["rl"]["new_tokens"] == 0
    assert rows["rl"]["policy_tokens"] == (rc.steps * rc.prompts_per_step * rc.samples_per_prompt
                                           + 2 * rc.eval_prompts) * rc.max_new_tokens
    assert rows["rl"]["steps"] == rc.steps and rows["rl"]["figures"] == 3
    assert rows["dpo"]["train_tokens"] > 0
    assert rows["sft"]["train_tokens"] > 0 and rows["preference_model"]["train_tokens"] > 0
    for stage in ("sft", "preference_model", "dpo"):
        assert rows[stage]["steps"] > 0 and rows[stage]["train_passes"] >= rows[stage]["steps"]
        assert rows[stage]["eval_passes"] > 0 and rows[stage]["figures"] >= 1
    assert all(r["seconds"] >= 0 for r in rows.values())
    cal, train = result["calibration"], result["training"]
    assert cal["gen_tokens_per_s"] > 0 and cal["engine_load_s"] > 0
    for key in ("train_tokens_per_s", "forward_tokens_per_s", "policy_gen_tokens_per_s", "optimizer_s", "save_s",
                "figure_s"):
        assert train[key] > 0, key
    text = render(result)
    assert "total estimated time" in text and "estimate" in text
    assert main(["plan", "--no-calibrate", f"engine.model={tiny_model}"]) == 0
    assert "no calibration" in capsys.readouterr().out


def test_gpu_vllm_preset_loads_and_passes_checks():
    cfg = load_config("gpu-vllm")
    check_config(cfg)
    assert cfg.engine.kind == "openai" and cfg.engine.endpoints and cfg.sft.model
    assert cfg.critique_revision.rounds == 4 and "evaluate" in cfg.stages and "report" in cfg.stages
