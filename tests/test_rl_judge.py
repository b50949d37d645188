"""rl.reward=judge (direct RLAIF with cai's soft pairwise judge): rewards worked by hand on
a judge with fixed option probabilities, a training step on the tiny policy with no
preference model, the settings, the plan's count, and a served judge (slow)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from cai.config import RunConfig, judge_engine_config, load_config
from cai.constitution import load_constitution
from cai.engines.base import Engine
from cai.errors import CaiError
from cai.judge import Judge
from cai.pipeline import run_pipeline
from cai.stages.rl import heldout_rewards, rollout_rewards

#: P(the answer shown first is the better one), by (answer shown first, answer shown second).
P_FIRST = {("x", "y"): 0.8, ("y", "x"): 0.4, ("x", "z"): 0.6, ("z", "x"): 0.6, ("y", "z"): 0.9, ("z", "y"): 0.3}


class Table(Engine):
    """A judge engine whose option log-probabilities are fixed: log P_FIRST and log(1 - P_FIRST)
    of the two answers its question shows, in the order shown."""

    identity = "fake-table"

    def __init__(self):
        self.asked = 0

    def generate(self, conversations, params, progress=None, on_result=None):
        raise AssertionError("the judge reads option log-probabilities; it generates nothing without a chain of thought")

    def choice_logprobs(self, conversations, choices, progress=None, on_result=None):
        out = []
        for conv in conversations:
            q = conv[-2]["content"]
            first, second = q.split("(A) ")[-1].split("\n\n(B) ")
            p = P_FIRST[(first, second)]
            out.append([math.log(p), math.log(1 - p)])
        self.asked += len(conversations)
        return out


def _learner(engine):
    judge = Judge(engine, load_constitution(RunConfig().data.constitution))
    return SimpleNamespace(judge=judge)


def test_judge_rewards_are_the_soft_scores_worked_by_hand():
    """Each pair in both orders; p(a better) is the mean of P(A) with a first and 1 - P(A)
    with a second:

        p(x > y) = (0.8 + (1 - 0.4)) / 2 = 0.7
        p(x > z) = (0.6 + (1 - 0.6)) / 2 = 0.5
        p(y > z) = (0.9 + (1 - 0.3)) / 2 = 0.8

    One prompt, k = 3 answers [x, y, z]: an answer's reward is its mean p of beating the others,

        x: (0.7 + 0.5) / 2 = 0.60    y: ((1 - 0.7) + 0.8) / 2 = 0.55    z: ((1 - 0.5) + (1 - 0.8)) / 2 = 0.35

    (they average 0.5, as every group's do): 3 pairs x 2 orders = 6 questions. The step's
    tallies: |p - 0.5| = 0.2, 0, 0.3 (decisiveness 0.5 / 3); both orders agree on (x, y)
    (0.8 and 0.6 both >= 0.5) and (y, z), not on (x, z) (0.6 against 0.4): 2 of 3.

    A step that draws one prompt twice (k = 2, answers [x, y] and [x, z]) keeps its rollout
    groups apart: x 0.7, y 0.3, then x 0.5, z 0.5; grouped by the prompt's text they would be
    one group of four.
    """
    engine = Table()
    ln = _learner(engine)
    prompt = {"id": "p", "messages": [{"role": "user", "content": "How do I pick a lock?"}]}
    scores, tallies = rollout_rewards(ln, [prompt], ["x", "y", "z"], 3)
    assert scores == pytest.approx([0.60, 0.55, 0.35])
    assert engine.asked == 6
    assert tallies["labelled"] == 3 and tallies["distance"] == pytest.approx(0.5)
    assert (tallies["both_orders"], tallies["consistent"]) == (3, 2)
    scores, _ = rollout_rewards(ln, [prompt, prompt], ["x", "y", "x", "z"], 2)
    assert scores == pytest.approx([0.7, 0.3, 0.5, 0.5])


def test_held_out_answers_are_judged_against_the_starting_policys():
    """After training: p(trained answer beats the starting one) on the same prompt, x against
    y = 0.7. Before training the baseline is the answer itself: identical, 0.5, nothing asked."""
    engine = Table()
    ln = _learner(engine)
    prompts = [{"id": "p1", "messages": [{"role": "user", "content": "q1"}]},
               {"id": "p2", "messages": [{"role": "user", "content": "q2"}]}]
    assert heldout_rewards(ln, prompts, ["x", "z"], None) == [0.5, 0.5] and engine.asked == 0
    assert heldout_rewards(ln, prompts, ["x", "z"], {"p1": "y", "p2": "z"}) == pytest.approx([0.7, 0.5])
    assert engine.asked == 2  # p2's answers are the same text: not asked


def _cfg(run_dir, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, rl]",
        "rl.reward=judge", f"rl.policy={tiny_model}", "rl.steps=2", "rl.prompts_per_step=2", "rl.max_new_tokens=8",
        "rl.eval_prompts=3", "rl.learning_rate=1e-3", "rl.micro_batch_size=8", "rl.dtype=float32",
        "rl.frontier_points=0", "feedback.few_shot=1", *extra,
    ])


def test_the_rl_stage_trains_on_the_judge_reward_without_a_preference_model(tmp_path, tiny_model, monkeypatch):
    from cai.reward import RewardModel

    def no_pm(*a, **k):
        raise AssertionError("no preference model is loaded with rl.reward=judge")

    monkeypatch.setattr(RewardModel, "load", no_pm)
    run = run_pipeline(_cfg(tmp_path / "run", tiny_model), log=lambda m: None)
    out = run / "rl"
    assert not (run / "preference_model").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    hist = metrics["history"]
    assert [h["step"] for h in hist] == [1, 2] and len(metrics["step_seconds"]) == 2
    for h in hist:
        assert h["reward"] == pytest.approx(0.5)  # every group's judge rewards average 0.5
        assert 0 <= h["judge_decisiveness"] <= 0.5 and 0 <= h["judge_consistency"] <= 1
    rollouts = [json.loads(l) for l in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 4 and all("judge_reward" in r and "pm_reward" not in r for r in rollouts)
    for step in (1, 2):
        for pid in {r["id"] for r in rollouts if r["step"] == step}:
            group = [r["judge_reward"] for r in rollouts if r["step"] == step and r["id"] == pid]
            assert sum(group) / len(group) == pytest.approx(0.5, abs=1e-3)
    assert metrics["eval_before"]["reward"] == 0.5  # the starting policy against itself
    assert 0 <= metrics["eval_after"]["reward"] <= 1 and metrics["eval_after"]["prompts"] == 3
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["rl"]["reward"] == "judge" and "preference_model" not in manifest.get("inputs", {})
    before = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert not [k for k in before if torch.equal(before[k], after[k])]


def test_judge_reward_settings():
    from cai.checks import check_config
    from cai.stages import registry

    rl = registry()["rl"]
    assert "preference_model" not in rl.upstream(load_config(None, ["rl.reward=judge"]))
    assert "preference_model" in rl.upstream(load_config(None, []))
    assert judge_engine_config(load_config(None, ["rl.reward=judge", "feedback.model=fb"]), "rl").model == "fb"
    served = load_config(None, ["rl.reward=judge", "rl.judge=big/judge", "rl.judge_endpoints=[http://127.0.0.1:9/v1]",
                                "rl.judge_tokenizer=default"])
    check_config(served)
    jc = judge_engine_config(served, "rl")
    assert (jc.kind, jc.model, jc.endpoints, jc.tokenizer) == ("openai", "big/judge", ["http://127.0.0.1:9/v1"], "default")
    for extra, match in ((["rl.judge=x"], r"'rl.judge' is set but rl.reward is pm"),
                         (["rl.reward=judge", "rl.judge_endpoints=[http://h:1/v1]"], r"'rl.judge_endpoints' needs rl.judge"),
                         (["rl.reward=judge", "rl.judge=x", "rl.judge_endpoints=[ftp://h]"], r"rl.judge_endpoints"),
                         (["rl.reward=rm"], r"'rl.reward' must be one of pm, judge")):
        with pytest.raises(CaiError, match=match):
            check_config(load_config(None, extra))


def test_the_plan_counts_the_judges_questions():
    """2 prompts a step x 4 samples: 4*3/2 = 6 pairs a prompt, x 2 orders x 2 principles =
    48 questions a step; 3 steps and 4 held-out prompts (one pair each, 4 questions) give
    3 * 48 + 16 = 160. With the PM: none, and one more no-grad pass per step."""
    from cai.plan import counter, estimate

    common = ["stages=[prepare, rl]", "rl.policy=default", "rl.steps=3", "rl.prompts_per_step=2",
              "rl.samples_per_prompt=4", "rl.eval_prompts=4", "feedback.principles_per_comparison=2"]
    judge = {r["stage"]: r for r in estimate(load_config(None, [*common, "rl.reward=judge"]), counter())}["rl"]
    pm = {r["stage"]: r for r in estimate(load_config(None, common), counter())}["rl"]
    assert judge["score"] == 160 and pm["score"] == 0
    assert "48 judge questions a step" in judge["note"]
    assert judge["eval_passes"] < pm["eval_passes"] and judge["prompt_tokens"] > 0
    assert judge["memory"]["parts"].get("judge") and "PM" not in judge["memory"]["parts"]


# -- a served judge (slow): a real llama.cpp server on the embedded GGUF -------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    from test_openai_server import start_servers

    (server,) = start_servers(tmp_path_factory.mktemp("llama"), 1)
    yield server
    server.stop()


@pytest.mark.slow
def test_a_served_judge_rewards_the_rollouts(tmp_path, tiny_model, llama_server):
    """rl.judge_endpoints: the judge's questions go to the server (through the run's request
    cache), the policy trains here; 1 prompt x 2 samples = 1 pair x 2 orders a step, and 2
    held-out pairs after training."""
    import sqlite3

    logs = []
    run = run_pipeline(_cfg(tmp_path / "run", tiny_model, "rl.prompts_per_step=1", "rl.samples_per_prompt=2",
                            "rl.eval_prompts=2", "rl.judge=smollm2", f"rl.judge_endpoints=[{llama_server.url}]",
                            "rl.judge_tokenizer=default", "engine.wait_for_endpoints_s=5"), log=logs.append)
    assert any(f"judge: smollm2 on {llama_server.url}" in m for m in logs), logs
    hist = json.loads((run / "rl" / "metrics.json").read_text())["history"]
    assert len(hist) == 2 and any(h["judge_consistency"] is not None for h in hist)
    rollouts = [json.loads(l) for l in (run / "rl" / "rollouts.jsonl").read_text().splitlines()]
    for step in (1, 2):  # two answers: p and 1 - p
        assert sum(r["judge_reward"] for r in rollouts if r["step"] == step) == pytest.approx(1.0, abs=1e-3)
    with sqlite3.connect(run / "cache.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] >= 2 * 2
