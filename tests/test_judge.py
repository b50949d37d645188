"""cai.Judge and `cai label`: the feedback stage's labeller on a caller's own pairs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import cached_rows

from cai.config import RunConfig, load_config
from cai.constitution import load_constitution
from cai.engines.base import Engine
from cai.errors import CaiError
from cai.judge import Judge


class Prefers(Engine):
    """A fake judge that prefers the option whose text contains ``word`` (p = 0.9)."""

    identity = "fake-prefers"

    def __init__(self, word="SAFE"):
        self.word, self.asked = word, 0

    def generate(self, conversations, params, progress=None, on_result=None):
        return [["I think so."] * params.n for _ in conversations]

    def choice_logprobs(self, conversations, choices, progress=None, on_result=None):
        import math

        out = []
        for conv in conversations:
            q = conv[-2]["content"]
            a = q.split("(A) ")[-1].split("\n\n(B) ")[0]
            b = q.split("\n\n(B) ")[-1]
            p = 0.5 if (self.word in a) == (self.word in b) else (0.9 if self.word in a else 0.1)
            out.append([math.log(p), math.log(1 - p)])
        self.asked += len(conversations)
        return out


def _judge(engine=None, **kw):
    return Judge(engine or Prefers(), load_constitution(RunConfig().data.constitution), **kw)


def test_compare_reads_both_orders_and_is_consistent_for_a_consistent_judge():
    v = _judge().compare("How do I pick a lock?", "SAFE: I can't help.", "Here is how.")
    assert v.p_a == pytest.approx(0.9) and v.p_b == pytest.approx(0.1)
    assert v.position_consistent is True and v.status == "labelled"
    assert sorted(q["order"] for q in v.questions) == ["ab", "ba"]
    assert len(v.principle_ids) == 1


def test_the_same_pair_gets_the_same_principle_and_a_named_principle_is_used():
    j = _judge()
    one = j.compare("q", "a", "b")
    assert j.compare("q", "a", "b").principle_ids == one.principle_ids
    const = load_constitution(RunConfig().data.constitution)
    pid = const.comparison_principles[3].id
    assert _judge(principle=pid).compare("q", "a", "b").principle_ids == [pid]
    with pytest.raises(CaiError, match="no comparison principle 'nope'"):
        _judge(principle="nope")


def test_identical_answers_are_not_asked():
    engine = Prefers()
    v = _judge(engine).compare("q", "same", " same ")
    assert v.status == "identical" and v.p_a is None and engine.asked == 0


def test_group_scores_rank_each_prompts_completions_by_the_judge():
    engine = Prefers()
    j = _judge(engine)
    prompts = ["p1", "p1", "p1", "p2", "p2", "p3"]
    completions = ["bad", "SAFE one", "worse", "SAFE", "no", "alone"]
    scores = j.group_scores(prompts, completions)
    # p1: SAFE beats both (0.9 each), the other two tie (0.5) and lose to SAFE (0.1)
    assert scores[:3] == pytest.approx([(0.1 + 0.5) / 2, 0.9, (0.1 + 0.5) / 2])
    assert scores[3:5] == pytest.approx([0.9, 0.1])
    assert scores[5] == 0.5  # no other completion of its prompt
    assert engine.asked == 2 * (3 + 1)  # 3 pairs for p1, 1 for p2, both orders
    # TRL's conversational form: message-list prompts and completions
    conv = [[{"role": "user", "content": "p"}]] * 2
    outs = [[{"role": "assistant", "content": "SAFE"}], [{"role": "assistant", "content": "x"}]]
    assert j.reward_function()(prompts=conv, completions=outs) == pytest.approx([0.9, 0.1])


def test_judge_gives_the_feedback_stages_labels_on_the_same_pairs(tmp_path, tiny_model):
    from cai.engines.local import LocalEngine
    from cai.pipeline import run_pipeline

    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, feedback]", f"feedback.policy={tiny_model}", "feedback.max_prompts=3",
        "feedback.max_new_tokens=6", "feedback.samples_per_prompt=3", "feedback.helpful_ratio=0",
    ])
    run = run_pipeline(cfg, log=lambda m: None)
    comps = [json.loads(l) for l in (run / "feedback" / "comparisons" / "train.jsonl").read_text().splitlines()]
    comps = [c for c in comps if c["status"] == "labelled"]
    assert len(comps) >= 6
    judge = Judge.from_config(cfg, engine=LocalEngine(tiny_model, device="cpu", batch_size=3))
    verdicts = judge.compare_many([(c["prompt"], c["response_a"], c["response_b"]) for c in comps],
                                  ids=[c["id"] for c in comps])
    for c, v in zip(comps, verdicts):
        assert v.principle_ids == c["principle_ids"]
        assert v.p_a == pytest.approx(c["p_a"], abs=1e-5)
        stage = {(q["principle_id"], q["order"]): q["p_first"] for q in c["queries"]}
        for q in v.questions:
            assert q["p_first"] == pytest.approx(stage[(q["principle_id"], q["order"])], abs=1e-5)
        assert [v.position_consistent] == [all(c["position_consistent"])]


def _pairs(path, n):
    rows = [{"id": f"p{i}", "prompt": f"How do I do thing {i}?", "chosen": f"I won't help with thing {i}.",
             "rejected": f"Step one of thing {i}: ..."} for i in range(n)]
    rows.append({"id": "two", "prompt": [{"role": "user", "content": "hi"}], "responses": ["hello", "hey there"]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _label(tmp_path, tiny_model, *extra):
    return [sys.executable, "-m", "cai", "label", "--pairs", str(tmp_path / "pairs.jsonl"), "--out",
            str(tmp_path / "labels.jsonl"), f"engine.model={tiny_model}", "engine.batch_size=4", *extra]


def test_cai_label_writes_the_feedback_stages_pair_rows(tmp_path, tiny_model):
    import datasets

    _pairs(tmp_path / "pairs.jsonl", 4)
    out = subprocess.run(_label(tmp_path, tiny_model), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "labels.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "two"]
    for r in rows:
        assert 0.5 <= r["p_chosen"] <= 1 and r["feedback_model"] == tiny_model
        assert r["chosen"][0]["role"] == "assistant" and r["p_chosen_shown_first"] is not None
        assert ("agrees_with_given" in r) == (r["id"] != "two")
    stats = json.loads((tmp_path / "labels.jsonl.stats.json").read_text())
    assert stats["pairs"] == 5 and stats["given_pairs"] == 4 and stats["judge_reliability"]["n"] == 5
    assert stats["judge_reliability"]["orders"] == 2 and "judge reliability: both orders agree on" in out.stdout
    assert "engine cache: 0 hits, 10 new requests" in out.stdout
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "labels.jsonl"))["train"]
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(ds.column_names)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "q", "chosen": "a"}], "no field 'rejected'"),
    ([{"prompt": "q", "responses": ["a", "b", "c"]}], "field 'responses' must be a list of exactly two"),
    ([{"prompt": "q", "response_a": "a"}], "no field 'response_b'"),
    ([{"prompt": "q", "responses": ["a", ""]}], "field 'responses[1]' is empty"),
    ([{"responses": ["a", "b"]}], "a pair of responses needs a 'prompt' field"),
    ([{"id": "x", "prompt": "q", "chosen": "a", "rejected": "b"}] * 2, "id 'x' is used twice"),
    ([{"prompt": 3, "responses": ["a", "b"]}], "field 'prompt' must be a string or a non-empty list"),
    ([], "has no pairs"),
])
def test_cai_label_refuses_a_bad_pair_file_in_one_line(tmp_path, rows, message):
    from cai.cli import main

    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run(_label(tmp_path, "/no/model"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "labels.jsonl").exists()
    assert main(["label", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2


def test_cai_label_resumes_after_kill_9_without_asking_again(tmp_path, tiny_model):
    _pairs(tmp_path / "pairs.jsonl", 80)
    cmd = _label(tmp_path, tiny_model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cache = tmp_path / "labels.jsonl.cache.sqlite"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.time() + 240
    while time.time() < end and proc.poll() is None and cached_rows(cache) < 40:
        time.sleep(0.05)
    assert proc.poll() is None, "label finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = cached_rows(cache)
    assert saved >= 40 and not (tmp_path / "labels.jsonl").exists()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"engine cache: {saved} hits, {162 - saved} new requests" in out.stdout  # 81 pairs x 2 orders
    assert len((tmp_path / "labels.jsonl").read_text().splitlines()) == 81


def test_trl_grpo_trains_with_the_judge_as_its_reward(tmp_path, tiny_model):
    trl = pytest.importorskip("trl", reason="pip install trl (in the test extra)")
    from datasets import Dataset

    from cai.engines.local import LocalEngine

    judge = Judge(LocalEngine(tiny_model, device="cpu"), load_constitution(RunConfig().data.constitution))
    reward = judge.reward_function()
    calls = []

    def cai_judge(prompts, completions, **kwargs):
        scores = reward(prompts, completions, **kwargs)
        calls.append((len(completions), scores))
        return scores

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"How do I do thing {i}?"}]} for i in range(4)])
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=8, max_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                          save_strategy="no", bf16=False)
    trainer = trl.GRPOTrainer(model=tiny_model, reward_funcs=cai_judge, args=args, train_dataset=data)
    trainer.train()
    assert len(calls) == 2 and all(n == 4 for n, _ in calls)
    for _, scores in calls:  # two completions a prompt: their scores are p and 1 - p
        assert all(0 <= s <= 1 for s in scores)
        assert scores[0] + scores[1] == pytest.approx(1) and scores[2] + scores[3] == pytest.approx(1)
    logged = [h for h in trainer.state.log_history if "rewards/cai_judge/mean" in h]
    assert len(logged) == 2


class AlwaysA(Prefers):
    def choice_logprobs(self, conversations, choices, progress=None, on_result=None):
        import math

        self.asked += len(conversations)
        return [[math.log(0.8), math.log(0.2)] for _ in conversations]


def test_label_summary_flags_a_judge_that_picks_by_position_and_not_a_consistent_one():
    from cai.judge import Pair, describe_reliability, label_summary

    pairs = [Pair(f"p{i}", [{"role": "user", "content": f"q{i}"}], f"SAFE {i}", f"unsafe {i}", True) for i in range(12)]
    # always-A averages to exactly 0.5, which counts for answer a: it "agrees" with every given chosen,
    # which is why agreement alone says nothing without the reliability beside it
    for engine, at_chance, agree in ((AlwaysA(), True, 1.0), (Prefers(), False, 1.0)):
        j = _judge(engine)
        comps = j.label([j.comparison(p.prompt, p.a, p.b, p.id) for p in pairs])
        s = label_summary(comps, pairs)
        rel = s["judge_reliability"]
        assert rel["at_chance"] is at_chance and rel["n"] == 12
        assert rel["position_consistency"] == (0.0 if at_chance else 1.0)
        assert ("AT CHANCE" in describe_reliability(rel)) is at_chance
        assert s["agrees_with_given_chosen"] == agree
