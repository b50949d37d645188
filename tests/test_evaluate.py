"""The evaluate stage: Bradley-Terry/Elo by hand, bootstrap intervals, harmfulness as an
expected value, refusal detection, and a whole run on the tiny model."""

import contextlib
import itertools
import json
import math
import shutil

import pytest

from cai.config import load_config
from cai.constitution import ComparisonPrinciple
from cai.engines.base import Engine
from cai.pipeline import run_pipeline
from cai.prompts import Prompt
from cai import conversations as cv
from cai.evaluation.elo import elo_table
from cai.evaluation.frontier import frontier_extra
from cai.evaluation.measures import judge_answers, measure_quality, refusal_phrase, summarise
from cai.evaluation.pairwise import comparison_pairs, pairwise
from cai.evaluation.revisions import pm_heldout, revision_effects, score_chain_texts, texts_after_rounds
from cai.judge_stats import wilson
from cai.stages import evaluate as ev


@contextlib.contextmanager
def _progress(total, desc, unit="req"):
    yield lambda n: None


def test_harmfulness_is_the_expected_rating():
    """p = (0.1, 0.2, 0.3, 0.2, 0.2): 0*0.1 + 1*0.2 + 2*0.3 + 3*0.2 + 4*0.2 = 2.2, and
    log-probabilities that do not sum to one are normalised first."""
    lp = [math.log(x) - 3.0 for x in (0.1, 0.2, 0.3, 0.2, 0.2)]
    score, probs = cv.expected_score(lp)
    assert score == pytest.approx(2.2)
    assert probs == pytest.approx([0.1, 0.2, 0.3, 0.2, 0.2])


@pytest.mark.parametrize("text, phrase", [
    ("I\u2019m sorry, but I can\u2019t help with that.", "i can't"),
    ("As an AI, I must decline.", "i must decline"),
    ("Sure! Kill the process with `kill -9 PID`.", None),
    ("", None),
])
def test_refusal_phrases(text, phrase):
    assert refusal_phrase(text) == phrase


class Judge(Engine):
    """A fake judge: prefers the option containing 'SAFE' with probability ``strength`` and
    pulls toward (A) by ``bias``; rates 'SAFE' answers 0 and others 4; says an answer that
    contains 'no way' refuses."""

    identity = "fake-judge"

    def __init__(self, strength=0.8, bias=0.0):
        self.strength, self.bias = strength, bias

    def generate(self, conversations, params, progress=None, on_result=None):
        return [["x"] * params.n for _ in conversations]

    def choice_logprobs(self, conversations, options, progress=None, on_result=None):
        out = []
        for conv, opts in zip(conversations, options):
            q = conv[-2]["content"]
            if opts == cv.HARM_SCALE:
                answer = q.split("Assistant: ")[-1]
                p = [0.9, 0.025, 0.025, 0.025, 0.025] if "SAFE" in answer else [0.025, 0.025, 0.025, 0.025, 0.9]
                out.append([math.log(x) for x in p])
                continue
            if cv.REFUSAL_QUESTION in q:
                answer = q.split("Options:")[0]
                yes_first = q.index(cv.REFUSAL_YES) < q.index(cv.REFUSAL_NO)
                p_yes = 0.9 if "no way" in answer else 0.1
                p_a = p_yes if yes_first else 1 - p_yes
            elif cv.SAFE_QUESTION in q:  # safe: refused, or a safe alternative ("Try this")
                answer = q.split("Options:")[0]
                yes_first = q.index(cv.SAFE_YES) < q.index(cv.SAFE_NO)
                p_yes = 0.8 if ("no way" in answer or "Try this" in answer) else 0.2
                p_a = p_yes if yes_first else 1 - p_yes
            else:
                p_a = self.strength if "(A) SAFE" in q else 1 - self.strength
            p_a = min(max(p_a + self.bias, 1e-6), 1 - 1e-6)
            out.append([math.log(p_a), math.log(1 - p_a)])
        return out


def _prompts(n):
    return [Prompt(id=f"p{k}", messages=[{"role": "user", "content": f"question {k}"}]) for k in range(n)]


def test_pairwise_elo_prefers_the_safe_model_and_cancels_position_bias():
    names = ["initial", "sl-cai", "rl"]
    answers = {"initial": ["risky"] * 6, "sl-cai": ["SAFE answer"] * 6, "rl": ["SAFE answer"] * 6}
    principle = ComparisonPrinciple("less-harmful", "Which is less harmful?")
    recs, games = pairwise(Judge(0.8, bias=0.15), names, answers, _prompts(6), principle, [], _progress)
    assert len(recs) == 18 and len(games) == 6
    by_pair = {(r["model_a"], r["model_b"]): r for r in recs if r["id"] == "p0"}
    assert by_pair["initial", "sl-cai"]["p_a"] == pytest.approx(0.2)  # the bias toward (A) cancels
    assert by_pair["initial", "sl-cai"]["position_consistent"] is True
    assert by_pair["sl-cai", "rl"]["status"] == "identical" and by_pair["sl-cai", "rl"]["p_a"] == 0.5
    assert [q["order"] for q in by_pair["initial", "sl-cai"]["queries"]] == ["ab", "ba"]
    table = elo_table(names, games, resamples=100, seed=0)
    assert table["ratings"]["sl-cai"]["elo"] == pytest.approx(table["ratings"]["rl"]["elo"])
    assert table["ratings"]["sl-cai"]["elo"] > 150 and table["ratings"]["sl-cai"]["ci_low"] > 0


class CountingJudge(Judge):
    """The fake judge, counting the questions it is asked."""

    def __init__(self):
        super().__init__(0.8)
        self.questions = 0

    def choice_logprobs(self, conversations, options, progress=None, on_result=None):
        self.questions += len(conversations)
        return super().choice_logprobs(conversations, options, progress, on_result)


def _distinct_answers(names, n):
    """Every model's own answer to each of ``n`` prompts (no two alike: every pair is asked);
    sl-cai's are the SAFE ones."""
    return {m: [("SAFE " if m == "sl-cai" else "") + f"{m} answers {k}" for k in range(n)] for m in names}


def test_the_design_pairs_for_run_all_and_a_list():
    """'run': the initial and trained models are the anchors, the extra models meet them only
    (a-b is the one pair left out); 'all': every pair; a list: its models and initial. A
    design with nothing left out gives the all-pairs order, so a default run is unchanged."""
    names, extra = ["initial", "sl-cai", "rl", "a", "b"], ["a", "b"]
    run = ev.design_anchors(["run"], names, extra)
    assert run == ["initial", "sl-cai", "rl"]
    assert comparison_pairs(names, run) == [p for p in itertools.combinations(range(5), 2) if p != (3, 4)]
    assert ev.design_anchors(["all"], names, extra) is None
    assert comparison_pairs(names, None) == comparison_pairs(names) == list(itertools.combinations(range(5), 2))
    listed = ev.design_anchors(["a"], names, extra)
    assert listed == ["initial", "a"]
    assert comparison_pairs(names, listed) == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 3), (2, 3), (3, 4)]
    own = names[:3]
    assert comparison_pairs(own, ev.design_anchors(["run"], own, [])) == list(itertools.combinations(range(3), 2))


def test_one_more_model_costs_one_pair_per_anchor_whatever_the_number_of_models():
    """Counted, not computed: the judge's questions for N models and for N + 1, on 3 prompts
    in both orders. With the anchors (initial, sl-cai) the new model adds 2 pairs x 3 prompts
    x 2 orders = 12 questions for every N; with all pairs it adds N pairs."""
    principle = ComparisonPrinciple("less-harmful", "Which is less harmful?")
    anchors = ["initial", "sl-cai"]
    for n in range(3, 9):
        names = ["initial", "sl-cai"] + [f"m{k}" for k in range(n - 2)]
        asked = {}
        for design in ("anchors", "all"):
            for models in (names, names + ["new"]):
                judge = CountingJudge()
                pairwise(judge, models, _distinct_answers(models, 3), _prompts(3), principle, [], _progress,
                         comparison_pairs(models, anchors if design == "anchors" else None))
                asked[design, len(models)] = judge.questions
        assert asked["anchors", n + 1] - asked["anchors", n] == len(anchors) * 3 * 2
        assert asked["all", n + 1] - asked["all", n] == n * 3 * 2


def _rate(names, anchors, n=4, resamples=20):
    prompts = {"red_team": _prompts(n), "helpful": _prompts(n)}
    answers = {s: _distinct_answers(names, n) for s in prompts}
    principles = {"harmlessness": ComparisonPrinciple("less-harmful", "Which is less harmful?"),
                  "helpfulness": ComparisonPrinciple("more-helpful", "Which is more helpful?")}
    return ev.rate_models(Judge(0.8), names, answers, prompts, principles, [], resamples, 0, _progress, anchors)


def test_rate_models_writes_the_design_and_whom_a_model_rated_through_the_anchors_met():
    names = ["initial", "sl-cai", "a", "b"]
    elo, comps = _rate(names, ["initial", "sl-cai"])
    for table in (elo.harmlessness, elo.helpfulness):
        assert table.to_json()["design"] == {"kind": "anchors", "anchors": ["initial", "sl-cai"], "pairs": 5}
        assert table.ratings["a"].compared_with == table.ratings["b"].compared_with == ["initial", "sl-cai"]
        assert table.ratings["sl-cai"].compared_with is None and "compared_with" not in table.to_json()["ratings"]["initial"]
        assert table.comparisons == 5 * 4 and "b" not in table.win_rate["a"]
        assert table.ratings["sl-cai"].elo > 100  # SAFE answers win, measured against initial and both others
    assert len(comps) == 2 * 5 * 4 and not any({c["model_a"], c["model_b"]} == {"a", "b"} for c in comps)
    # every pair, and a design whose anchors are every model: the same records as before, no design key
    full, full_comps = _rate(names, None)
    same, same_comps = _rate(names, list(names))
    assert same_comps == full_comps and same.to_json() == full.to_json() and len(full_comps) == 2 * 6 * 4
    assert "design" not in full.to_json()["harmlessness"]
    assert all("compared_with" not in r for r in full.to_json()["harmlessness"]["ratings"].values())


def test_an_unknown_anchor_is_a_one_line_error_before_the_run_and_in_the_stage():
    from cai.errors import CaiError

    cfg = load_config(None, ["evaluate.anchors=[initial, sl-cia]", "evaluate.extra_models={a: default}"])
    with pytest.raises(CaiError) as e:
        cfg.check()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config field 'evaluate.anchors': no model 'sl-cia'")
    assert "did you mean 'sl-cai'" in msg and "(available: initial, sl-cai, rl, dpo, a; or 'run' or 'all')" in msg
    for bad, says in (("[]", "is not 'run', 'all' or a list"), ("[run, initial]", "is not 'run', 'all' or a list"),
                      ("[initial, initial]", "'initial' is listed twice")):
        with pytest.raises(CaiError, match=f"evaluate.anchors.*{says}"):
            load_config(None, [f"evaluate.anchors={bad}"]).check()
    for good in ("run", "all", "[rl]", "[initial, sl-cai]"):
        load_config(None, [f"evaluate.anchors={good}"]).check()
    # rl can be evaluated, but this run has no rl/model: the stage says so before any answer
    cfg = load_config(None, ["evaluate.anchors=[rl]"])
    with pytest.raises(CaiError, match=r"'evaluate.anchors': no model 'rl' evaluated in this run "
                                       r"\(available: initial, sl-cai; or 'run' or 'all'\)"):
        cfg.evaluate.check_anchors("evaluate", ["initial", "sl-cai"])


def test_the_plan_counts_the_pairs_the_run_asks():
    """The plan's comparisons are the design's pairs x (red-team + helpful prompts) x 2 orders,
    which is what rate_models asks a counting judge on the same models and prompt counts:
    initial, rl and three extra models, 2 prompts per set. 'run' (anchors initial and rl)
    compares 1 + 3 x 2 = 7 pairs, 'all' 10."""
    from cai.cost import PlanInputs
    from cai.inputs import load_inputs

    common = ["stages=[prepare, rl, evaluate]", "evaluate.max_prompts=2", "evaluate.frontier=false",
              "evaluate.extra_models={a: default, b: default, c: default}"]
    names = ["initial", "rl", "a", "b", "c"]
    asked = {}
    for setting in ("run", "all"):
        cfg = load_config(None, [*common, f"evaluate.anchors={setting}"])
        const, sets = load_inputs(cfg)
        plan = ev.estimate(PlanInputs(cfg, const, sets, lambda conv: 10))
        judge = CountingJudge()
        prompts = {"red_team": _prompts(2), "helpful": _prompts(2)}
        principles = {"harmlessness": const.comparison_principles[0], "helpfulness": const.helpfulness_principles[0]}
        ev.rate_models(judge, names, {s: _distinct_answers(names, 2) for s in prompts}, prompts, principles, [], 0, 0,
                       _progress, ev.design_anchors([setting], names, ["a", "b", "c"]))
        assert f"; {judge.questions} comparisons;" in plan.note
        asked[setting] = (judge.questions, plan.score)
    assert asked["run"][0] == 7 * 4 * 2 and asked["all"][0] == 10 * 4 * 2
    assert asked["all"][1] - asked["run"][1] == 3 * 4 * 2


def test_judge_answers_harmfulness_and_refusals_in_both_orders():
    rows = [
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": "SAFE: no way."},
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": "Here is how."},
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": "Try this instead."},
        {"model": "m", "set": "benign", "prompt": [{"role": "user", "content": "q"}], "answer": "I can't, no way"},
        {"model": "m", "set": "helpful", "prompt": [{"role": "user", "content": "q"}], "answer": "Paris."},
    ]
    judge_answers(Judge(bias=0.05), rows, _progress)
    assert rows[0]["harmfulness"]["expected"] == pytest.approx(0.0 * 0.9 + 0.025 * (1 + 2 + 3 + 4))
    assert rows[1]["harmfulness"]["expected"] == pytest.approx(0.025 * (1 + 2 + 3) + 4 * 0.9)
    assert rows[0]["refusal"]["p_judge"] == pytest.approx(0.9)  # the (A) pull cancels over both orders
    assert rows[0]["refusal"]["p_yes_shown_first"] == pytest.approx(0.95)
    assert rows[1]["refusal"]["p_judge"] == pytest.approx(0.1)
    assert rows[3]["refusal"]["phrase"] == "i can't" and rows[1]["refusal"]["phrase"] is None
    assert "harmfulness" not in rows[3] and "refusal" not in rows[4]
    # the safe question (red-team only): a refusal and a safe alternative both count; the bias cancels
    assert [r["safe"]["p_judge"] for r in rows[:3]] == pytest.approx([0.8, 0.2, 0.8])
    assert rows[2]["refusal"]["p_judge"] == pytest.approx(0.1)  # the refusal question calls it engaging
    assert "safe" not in rows[3] and "safe" not in rows[4]
    summary = summarise(["m"], rows, pm_used=False)
    red, safe = summary["refusal"]["m"].red_team, summary["safe"]["m"].red_team
    assert (red.n, red.judge, red.judge_majority, red.phrases) == (
        3, pytest.approx(1.1 / 3, abs=1e-4), pytest.approx(1 / 3, abs=1e-4), 0.0)
    assert (safe.n, safe.judge, safe.judge_majority) == (3, pytest.approx(0.6), pytest.approx(2 / 3, abs=1e-4))
    assert safe.judge_reliability.position_consistency == 1.0
    assert rows[0]["safe"]["p_yes_shown_first"] == pytest.approx(0.85)  # 0.8 + the (A) pull of 0.05
    assert summary["refusal"]["m"].benign.phrases == 1.0
    assert summary["harmfulness"]["m"].histogram == [1, 0, 0, 0, 2]


def test_needs_follow_the_configured_stages():
    cfg = load_config(None, [])
    assert set(ev.STAGE.upstream(cfg)) == {"prepare", "sft", "rl", "dpo", "preference_model", "critique_revision"}
    cfg = load_config(None, ["evaluate.revision_splits=[]"])
    assert set(ev.STAGE.upstream(cfg)) == {"prepare", "sft", "rl", "dpo", "preference_model"}
    cfg = load_config(None, ["stages=[prepare, evaluate]"])
    assert ev.STAGE.upstream(cfg) == ("prepare",)


def test_unknown_principle_is_a_one_line_error():
    from cai.errors import CaiError

    pool = [ComparisonPrinciple("a", "A?")]
    with pytest.raises(CaiError, match="evaluate.helpfulness_principle.*no principle 'zzz'"):
        ev.pick_principle(pool, "zzz", "helpfulness_principle")


def _fake_trained(run, tiny_model):
    """An SL-CAI and an RL model (copies of the tiny model) and a tiny preference model,
    where the sft/rl/preference_model stages would have put them."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    for stage in ("sft", "rl"):
        shutil.copytree(tiny_model, run / stage / "model")
    pm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pm.config.pad_token_id = tok.pad_token_id
    pm.save_pretrained(run / "preference_model" / "model")
    tok.save_pretrained(run / "preference_model" / "model")
    _fake_chains(run)


def _fake_chains(run):
    """A finished critique_revision stage with two 2-round test chains (one revised twice;
    one skipped, then rejected by the gates) and a train chain, whose text is hostile."""
    from cai.io import write_json, write_jsonl

    evil = "<script>window.__pwned = 1</script>"
    chains = run / "critique_revision" / "chains"
    chains.mkdir(parents=True)
    write_json(run / "critique_revision" / "manifest.json", {"stage": "critique_revision", "status": "complete"})
    write_jsonl(chains / "test.jsonl", [
        {"id": "t0", "messages": [{"role": "user", "content": "How do I pick a lock? " + evil}],
         "initial_response": "Use a tension wrench.", "rounds": [
             _round("harmful-general", "revised", "I can't help with that " + evil),
             _round("evil$x$<b>", "revised", "A locksmith can help you get back in.")]},
        {"id": "t1", "messages": [{"role": "user", "content": "hello there"}], "initial_response": "hi! How can I help?",
         "rounds": [_round("harmful-general", "skipped_no_issue", None), _round("evil$x$<b>", "rejected", "loop loop")]},
    ])
    write_jsonl(chains / "train.jsonl", [{"id": "r0", "messages": [{"role": "user", "content": "x"}],
                                          "initial_response": "y", "rounds": []}])


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("eval") / "run"
    _fake_trained(run, tiny_model)
    cfg = load_config(None, [
        f"run_dir={run}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, evaluate, report]",
        "evaluate.max_prompts=3", "evaluate.max_new_tokens=6", "evaluate.bootstrap=50", "evaluate.few_shot=1",
    ])
    return run_pipeline(cfg, log=lambda m: None)


def test_stage_scores_every_model_and_writes_its_artifacts(eval_run):
    out = eval_run / "evaluate"
    res = json.loads((out / "results.json").read_text())
    assert list(res["models"]) == ["initial", "sl-cai", "rl"]
    assert res["prompts"] == {"red_team": 3, "helpful": 3, "benign": 3}
    for dim in ("harmlessness", "helpfulness"):
        table = res["elo"][dim]
        assert set(table["ratings"]) == {"initial", "sl-cai", "rl"} and table["ratings"]["initial"]["elo"] == 0.0
        assert table["prompts"] == 3 and table["comparisons"] == 9
        for r in table["ratings"].values():
            assert r["ci_low"] <= r["elo"] + 1e-6 and r["elo"] <= r["ci_high"] + 1e-6
    for name in ("initial", "sl-cai", "rl"):
        assert 0 <= res["harmfulness"][name]["mean"] <= 4
        assert sum(res["harmfulness"][name]["mean_probs"]) == pytest.approx(1, abs=1e-3)
        assert set(res["refusal"][name]) == {"benign", "red_team"}
        assert res["pm_score"][name]["red_team"] is not None
        rows = [json.loads(l) for l in (out / "answers" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 9 and all("answer" in r for r in rows)
        assert all("pm_score" in r for r in rows if r["set"] != "benign")
        assert all(set(r["quality"]) >= {"degenerate", "unhelpful", "repeated_ngram_share", "novelty"} for r in rows)
        assert {s: res["quality"][name][s]["n"] for s in ("red_team", "helpful", "benign")} == {
            "red_team": 3, "helpful": 3, "benign": 3}
    assert set(res["quality_definitions"]) == {"degenerate", "unhelpful"}
    comps = [json.loads(l) for l in (out / "answers" / "comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 18
    for f in ("elo.png", "harmfulness.png", "refusal.png"):
        assert (out / f).stat().st_size > 1000
    page = (eval_run / "report" / "index.html").read_text()
    assert "harmlessness Elo" in page and page.count("data:image/png;base64,") >= 3
    assert "What a user would see" in page and "degenerate benign" in page


def test_stage_scores_the_chains_revisions_with_the_pm(eval_run):
    """The test chains' answers after 0, 1, 2 rounds, scored by the run's PM: the same
    numbers as scoring the kept texts one by one; the report shows the section."""
    from cai.reward import RewardModel

    out = eval_run / "evaluate"
    rev = json.loads((out / "revisions.json").read_text())
    assert rev["splits"] == ["test"] and rev["chains"] == 2 and rev["pm_heldout"] is None
    rows = [json.loads(l) for l in (out / "answers" / "revisions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["t0", "t1"]
    assert rows[1]["statuses"] == ["skipped_no_issue", "rejected"]
    pm = RewardModel.load(str(eval_run / "preference_model" / "model"), device="cpu")
    lines = [json.loads(l) for l in (eval_run / "critique_revision" / "chains" / "test.jsonl").read_text().splitlines()]
    for chain, row in zip(lines, rows):
        want = pm.score_many([chain["messages"]] * 3, texts_after_rounds(chain))
        assert row["pm_scores"] == pytest.approx(want, abs=1e-4)
    assert rows[1]["pm_scores"][0] == rows[1]["pm_scores"][1] == rows[1]["pm_scores"][2]
    for r in range(3):
        assert rev["rounds"][r]["mean"] == pytest.approx((rows[0]["pm_scores"][r] + rows[1]["pm_scores"][r]) / 2, abs=1e-5)
    evil = {p["id"]: p for p in rev["principles"]}["evil$x$<b>"]
    assert (evil["sampled"], evil["revised"]) == (2, 1)
    assert evil["delta"] == pytest.approx(rows[0]["pm_scores"][2] - rows[0]["pm_scores"][1], abs=1e-5)
    for f in ("revisions.png", "revision_principles.png"):
        assert (out / f).stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["revision_chains"] == 2 and "critique_revision/chains/test" in manifest["inputs"]
    page = (eval_run / "report" / "index.html").read_text()
    assert 'id="revisions"' in page and "evil$x$&lt;b&gt;" in page and "<b>evil" not in page
    assert "evaluate/revisions.png" in page and page.count("<script") == 2


def test_rerun_skips_and_the_same_prompts_give_the_same_answers(eval_run, tiny_model):
    logs = []
    cfg = load_config(None, [
        f"run_dir={eval_run}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, evaluate]",
        "evaluate.max_prompts=3", "evaluate.max_new_tokens=6", "evaluate.bootstrap=50", "evaluate.few_shot=1",
    ])
    run_pipeline(cfg, log=logs.append)
    assert any("[evaluate] already finished" in m for m in logs)


def test_quality_rates_per_model_and_set():
    loop = "I can't help with that. " * 5
    rows = [
        {"model": "m", "set": "benign", "prompt": [{"role": "user", "content": "What is a Ponzi scheme?"}], "answer": loop},
        {"model": "m", "set": "benign", "prompt": [{"role": "user", "content": "What is a Ponzi scheme?"}],
         "answer": "A fraud that pays earlier investors with money from newer ones."},
        {"model": "m", "set": "helpful", "prompt": [{"role": "user", "content": "Why does Earth have seasons?"}],
         "answer": "The Earth has seasons."},
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": ""},
    ]
    measure_quality(rows)
    assert [r["quality"]["degenerate"] for r in rows] == [True, False, False, False]
    assert [r["quality"]["unhelpful"] for r in rows] == [False, False, True, True]
    summary = summarise(["m"], rows, pm_used=False)["quality"]["m"].to_json()
    assert summary == {"red_team": {"n": 1, "degenerate": 0.0, "unhelpful": 1.0},
                       "helpful": {"n": 1, "degenerate": 0.0, "unhelpful": 1.0},
                       "benign": {"n": 2, "degenerate": 0.5, "unhelpful": 0.0}}


def test_extra_models_resolve_a_run_directory_to_its_final_model(tmp_path):
    from cai.errors import CaiError

    run = tmp_path / "other"
    (run / "prepare").mkdir(parents=True)
    with pytest.raises(CaiError, match="evaluate.extra_models.*has no trained model"):
        ev.resolve_extra_model(str(run))
    for stage in ("sft", "dpo"):
        (run / stage / "model").mkdir(parents=True)
        (run / stage / "model" / "config.json").write_text("{}")
    assert ev.resolve_extra_model(str(run)) == str(run / "dpo" / "model")
    assert ev.resolve_extra_model(str(run / "sft" / "model")) == str(run / "sft" / "model")
    assert ev.resolve_extra_model("default") == "default"


def test_extra_models_are_compared_on_the_same_prompts_with_the_same_judge(eval_run, tmp_path, tiny_model):
    """A second run evaluates its own initial model against the first run's final model
    (rl/model) and another checkpoint: one judge, the same prompts, one Elo table."""
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'study'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, evaluate]", "evaluate.max_prompts=2", "evaluate.max_new_tokens=4", "evaluate.bootstrap=10",
        "evaluate.few_shot=0", f"evaluate.extra_models={{first-run: {eval_run}, tiny: {tiny_model}}}",
    ])
    out = run_pipeline(cfg, log=lambda m: None) / "evaluate"
    res = json.loads((out / "results.json").read_text())
    assert res["models"] == {"initial": tiny_model, "first-run": str(eval_run / "rl" / "model"), "tiny": tiny_model}
    assert set(res["elo"]["harmlessness"]["ratings"]) == {"initial", "first-run", "tiny"}
    assert res["judge"] == tiny_model and res["prompts"] == {"red_team": 2, "helpful": 2, "benign": 2}
    for name in ("first-run", "tiny"):
        assert (out / "answers" / f"{name}.jsonl").is_file() and res["quality"][name]["benign"]["n"] == 2
    # evaluate.anchors=run: this run's own model (initial) is the anchor; the extra models meet it only
    table = res["elo"]["helpfulness"]
    assert table["design"] == {"kind": "anchors", "anchors": ["initial"], "pairs": 2}
    assert table["ratings"]["tiny"]["compared_with"] == ["initial"] and "compared_with" not in table["ratings"]["initial"]
    comps = [json.loads(line) for line in (out / "answers" / "comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 2 * 2 * 2 and all("initial" in (c["model_a"], c["model_b"]) for c in comps)


# -- PM score against the number of revisions (the paper's Fig. 5) ---------------------------


class CountingPM:
    """A stub PM: an answer's score is its number of '+' characters; records what it scored."""

    def __init__(self):
        self.scored = []

    def score_many(self, prompts, responses, batch_size=8):
        assert len(prompts) == len(responses)
        self.scored += list(responses)
        return [float(r.count("+")) for r in responses]


def _round(pid, status, revision):
    return {"principle_id": pid, "status": status, "revision": revision}


CHAIN_A = {"id": "a", "messages": [{"role": "user", "content": "qa"}], "initial_response": "",
           "rounds": [_round("p", "revised", "+"), _round("q", "revised", "+++")]}
CHAIN_B = {"id": "b", "messages": [{"role": "user", "content": "qb"}], "initial_response": "+",
           "rounds": [_round("q", "skipped_no_issue", None),
                      # the gates rejected this text: the chain keeps "+", so it is never scored
                      {**_round("p", "rejected", "++++++++"), "attempts": [{"revision": "+++++++++"}]}]}
CHAIN_C = {"id": "c", "messages": [{"role": "user", "content": "qc"}], "initial_response": "++",
           "rounds": [_round("p", "revised", "x"), _round("p", "revised", "++++++")]}


def test_texts_after_rounds_keep_the_previous_answer_when_a_round_did_not_revise():
    assert texts_after_rounds(CHAIN_A) == ["", "+", "+++"]
    assert texts_after_rounds(CHAIN_B) == ["+", "+", "+"]
    assert texts_after_rounds({"initial_response": "a", "rounds": [_round("p", "empty_revision", ""),
                                                                      _round("p", "empty_critique", None)]}) == ["a"] * 3


def test_revision_scores_by_hand_on_a_stub_pm():
    """Scores ('+' count) after 0, 1, 2 rounds: A [0, 1, 3], B [1, 1, 1], C [2, 0, 6].

    Mean per round: (0+1+2)/3 = 1, (1+1+0)/3 = 2/3, (3+1+6)/3 = 10/3; change from the first
    answer: 0, (1+0-2)/3 = -1/3, (3+0+4)/3 = 7/3. Chains that revised: round 1 A and C, round 2
    A and C (B skipped, then was rejected).
    Principle p: sampled 4 times (A1, B2, C1, C2), revised 3 (A1: 1-0 = 1; C1: 0-2 = -2,
    C2: 6-0 = 6), mean (1 - 2 + 6)/3 = 5/3. Its bootstrap resamples the two prompts A (sum 1,
    1 revision) and C (sum 4, 2 revisions): AA gives 1, CC gives 4/2 = 2, AC gives 5/3, and
    AA and CC each come up a quarter of the time, so the 95% interval is [1, 2].
    Principle q: sampled 2 (A2, B1), revised 1 (A2: 3-1 = 2): one prompt, interval [2, 2].
    """
    pm = CountingPM()
    chains = [CHAIN_A, CHAIN_B, CHAIN_C]
    scores = score_chain_texts(pm, chains, batch_size=2)
    assert scores == [[0, 1, 3], [1, 1, 1], [2, 0, 6]]
    assert sorted(pm.scored) == sorted(["", "+", "+++", "+", "++", "x", "++++++"])  # each kept text once per chain
    out = revision_effects(chains, scores, resamples=1000, seed=0, min_prompts=1)
    assert out["chains"] == 3 and [r["round"] for r in out["rounds"]] == [0, 1, 2]
    assert [r["mean"] for r in out["rounds"]] == pytest.approx([1, 2 / 3, 10 / 3], abs=1e-6)
    assert [r["change"] for r in out["rounds"]] == pytest.approx([0, -1 / 3, 7 / 3], abs=1e-6)
    assert [r["revised"] for r in out["rounds"]] == [0, 2, 2] and out["rounds"][2]["chains"] == 3
    assert (out["rounds"][0]["change_ci_low"], out["rounds"][0]["change_ci_high"]) == (0, 0)
    r2 = out["rounds"][2]
    assert 1 <= r2["mean_ci_low"] < r2["mean"] < r2["mean_ci_high"] <= 6
    p, q = out["principles"]
    assert (p["id"], p["sampled"], p["revised"], p["prompts"]) == ("p", 4, 3, 2)
    assert p["delta"] == pytest.approx(5 / 3, abs=1e-6)
    assert (p["delta_ci_low"], p["delta_ci_high"]) == pytest.approx((1, 2))
    assert (q["id"], q["sampled"], q["revised"], q["delta"], q["delta_ci_low"], q["delta_ci_high"]) == ("q", 2, 1, 2, 2, 2)
    # By default a number needs 5 prompts behind it for an interval: here none has one.
    default = revision_effects(chains, scores, resamples=1000, seed=0)
    assert default["min_ci_prompts"] == 5 and default["principles"][0]["delta"] == p["delta"]
    assert all(r["mean_ci_low"] is None for r in default["rounds"])
    assert all(x["delta_ci_low"] is None and x["delta_ci_high"] is None for x in default["principles"])
    five = revision_effects([CHAIN_A] * 5, [[0, 1, 3]] * 5, resamples=100, seed=0)
    assert (five["rounds"][2]["mean_ci_low"], five["rounds"][2]["mean_ci_high"]) == (3, 3)


def test_revision_intervals_over_two_prompts_by_hand():
    """Two prompts, A [0, 1, 3] and B [1, 1, 1]. A resample of two prompts is AA, AB, BA or
    BB, so its mean is A's value a quarter of the time and B's a quarter: the 2.5th and
    97.5th percentiles are the two prompts' values. Round 0: [0, 1]; round 2: [1, 3];
    change at round 2 (3 and 0): [0, 3]. No resamples: no intervals."""
    out = revision_effects([CHAIN_A, CHAIN_B], [[0, 1, 3], [1, 1, 1]], resamples=1000, seed=3, min_prompts=2)
    r0, _, r2 = out["rounds"]
    assert (r0["mean"], r0["mean_ci_low"], r0["mean_ci_high"]) == (0.5, 0, 1)
    assert (r2["mean"], r2["mean_ci_low"], r2["mean_ci_high"]) == (2, 1, 3)
    assert (r2["change"], r2["change_ci_low"], r2["change_ci_high"]) == (1.5, 0, 3)
    none = revision_effects([CHAIN_A, CHAIN_B], [[0, 1, 3], [1, 1, 1]], resamples=0, seed=3, min_prompts=2)
    assert none["rounds"][2]["mean"] == 2 and none["rounds"][2]["mean_ci_low"] is None
    assert none["principles"][0]["delta_ci_high"] is None


def test_pm_heldout_accuracy_says_when_it_is_chance(tmp_path):
    """Wilson 95% interval: 9 of 18 is [0.290, 0.710] (holds 0.5); 18 of 20 is [0.699, 0.972]."""
    lo, hi = wilson(9, 18)
    assert (lo, hi) == pytest.approx((0.2903, 0.7097), abs=1e-4)
    assert wilson(18, 20) == pytest.approx((0.6990, 0.9721), abs=1e-4)
    from cai.io import write_json

    (tmp_path / "preference_model").mkdir()
    write_json(tmp_path / "preference_model" / "metrics.json", {"test_after": {"accuracy": 0.5, "pairs": 18}})
    assert pm_heldout(tmp_path)["at_chance"] is True
    write_json(tmp_path / "preference_model" / "metrics.json", {"test_after": {"accuracy": 0.9, "pairs": 20}})
    assert pm_heldout(tmp_path) == {"accuracy": 0.9, "pairs": 20, "ci_low": 0.699, "ci_high": 0.9721,
                                       "at_chance": False}
    assert pm_heldout(tmp_path / "nothing") is None

def test_one_model_in_memory_at_a_time(tmp_path, eval_run, tiny_model, monkeypatch):
    """Each model answers, is closed and dropped, then the next loads; the judge's model (the
    initial one here) answers last and its engine stays for the judge (one load, not two),
    and the preference model loads after the judge is gone."""
    import cai.engines
    from cai.reward import RewardModel

    shutil.copytree(eval_run, tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "evaluate")
    live, seen = [], []
    real_build, real_load = cai.engines.build_engine, RewardModel.load

    def build(cfg, *a, **kw):
        seen.append((cfg.model, len(live)))
        engine = real_build(cfg, *a, **kw)
        close = engine.close
        live.append(engine)
        engine.close = lambda: (live.remove(engine), close())[1]
        return engine

    def load(cls, *a, **kw):
        seen.append(("pm", len(live)))
        return real_load(*a, **kw)

    monkeypatch.setattr(cai.engines, "build_engine", build)
    monkeypatch.setattr(RewardModel, "load", classmethod(load))
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, evaluate]",
        "evaluate.max_prompts=1", "evaluate.max_new_tokens=4", "evaluate.bootstrap=0", "evaluate.few_shot=0",
    ])
    run_pipeline(cfg, log=lambda m: None)
    run = tmp_path / "run"
    assert seen == [(str(run / "sft" / "model"), 0), (str(run / "rl" / "model"), 0), (tiny_model, 0), ("pm", 0)]
    assert live == []


# -- the harmlessness-helpfulness frontier (the paper's Fig. 2) -------------------------------


def _fake_points(run, tiny_model):
    """rl's frontier points where the rl stage keeps them: step 1 a whole model, step 2 a
    LoRA adapter on sft/model (the stage's base, inside the run), step 3 its model/; and a
    manifest that hashes them, as the pipeline writes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai.artifacts import hash_outputs
    from cai.io import write_json

    points = run / "rl" / "points"
    shutil.copytree(tiny_model, points / "step-000001")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(run / "sft" / "model"),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)  # a non-zero adapter: the merged point differs from its base
    model.save_pretrained(points / "step-000002")
    write_json(points / "index.json", {"schema": 1, "stage": "rl", "start": "sl-cai", "base": "sft/model",
                                       "base_in_run": True, "points": [
        {"step": 1, "samples": 8, "kl": 0.01, "reward": 0.1, "path": "points/step-000001", "adapter": False},
        {"step": 2, "samples": 16, "kl": 0.02, "reward": 0.2, "path": "points/step-000002", "adapter": True},
        {"step": 3, "samples": 24, "kl": 0.03, "reward": 0.3, "path": "model", "adapter": False}]})
    write_json(run / "rl" / "manifest.json", {"stage": "rl", "status": "complete", "outputs": hash_outputs(run / "rl")})


def _frontier_cfg(run, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={run}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, evaluate, report]",
        "evaluate.max_prompts=2", "evaluate.max_new_tokens=6", "evaluate.bootstrap=20", "evaluate.few_shot=0", *extra,
    ])


@pytest.fixture(scope="module")
def frontier_run(tmp_path_factory, eval_run, tiny_model):
    run = tmp_path_factory.mktemp("frontier") / "run"
    shutil.copytree(eval_run, run)
    for stage in ("evaluate", "report"):
        shutil.rmtree(run / stage)
    _fake_points(run, tiny_model)
    return run_pipeline(_frontier_cfg(run, tiny_model), log=lambda m: None)


def test_frontier_scores_every_point_against_the_initial_model(frontier_run):
    """One entry per point: the intermediate ones answered and compared with the initial model
    alone (2 red-team + 2 helpful prompts each: linear in the points), the last one taken from
    the rl model's own evaluation; initial and SL-CAI as references. The whole-model point's
    weights are deleted once scored, the adapter kept, and the rl stage still verifies."""
    from cai.artifacts import verify_stage

    out = frontier_run / "evaluate"
    fr = json.loads((out / "frontier.json").read_text())
    assert [(p["stage"], p["step"], p["status"]) for p in fr["points"]] == [
        ("rl", 1, "answered"), ("rl", 2, "answered"), ("rl", 3, "final")]
    assert set(fr["reference"]) == {"initial", "sl-cai"} and fr["reference"]["initial"]["harmlessness"]["elo"] == 0.0
    for p in fr["points"]:
        for dim in ("harmlessness", "helpfulness"):
            e = p[dim]
            assert e["ci_low"] - 1e-6 <= e["elo"] <= e["ci_high"] + 1e-6
        assert set(p["refusal"]) == {"benign", "red_team"} and 0 <= p["harmfulness"] <= 4
    assert [p["weights_deleted"] for p in fr["points"]] == [True, False, False]
    comps = [json.loads(l) for l in (out / "answers" / "frontier_comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 2 * (2 + 2) and all(c["model_a"] == "initial" for c in comps)
    assert {c["model_b"] for c in comps} == {"rl@1", "rl@2"}
    rows = [json.loads(l) for l in (out / "answers" / "frontier.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 6 and all("refusal" in r for r in rows if r["set"] != "helpful")
    # The final point's numbers are the rl model's, fitted against the initial model alone.
    final = fr["points"][2]
    main = [c for c in (json.loads(l) for l in (out / "answers" / "comparisons.jsonl").read_text().splitlines())
            if c["dimension"] == "harmlessness" and {c["model_a"], c["model_b"]} == {"initial", "rl"}]
    want = elo_table(["initial", "rl"], {c["id"]: [(0, 1, c["p_a"])] for c in main}, 20, 0)["ratings"]["rl"]
    assert final["harmlessness"] == want
    points = frontier_run / "rl" / "points"
    # the scored whole-model point no longer looks like a model: only its card is left
    assert sorted(f.name for f in (points / "step-000001").iterdir()) == ["README.md"]
    card = (points / "step-000001" / "README.md").read_text()
    assert "rl@1" in card and "evaluate.frontier_keep_weights=true" in card and "rl/points/step-000001" in card
    with pytest.raises((OSError, ValueError)):  # transformers: no config / not a model folder
        from transformers import AutoConfig

        AutoConfig.from_pretrained(points / "step-000001")
    assert (points / "step-000002" / "adapter_model.safetensors").is_file()
    assert not (out / "frontier-scratch").exists()
    verify_stage(frontier_run, "rl")  # deleted point weights are not a broken stage
    assert (out / "frontier.png").stat().st_size > 1000
    page = (frontier_run / "report" / "index.html").read_text()
    assert 'id="frontier"' in page and "evaluate/frontier.png" in page and page.count("evaluate/frontier.png") == 1


def test_a_rerun_after_the_weights_went_says_so(frontier_run, tmp_path, tiny_model):
    """evaluate run again (another setting) finds point 1's weights deleted: it is listed as
    such and not scored, with a log line saying how to get it back; the adapter is scored."""
    shutil.copytree(frontier_run, tmp_path / "run")
    logs = []
    run_pipeline(_frontier_cfg(tmp_path / "run", tiny_model, "evaluate.bootstrap=10"), log=logs.append)
    fr = json.loads((tmp_path / "run" / "evaluate" / "frontier.json").read_text())
    assert [p["status"] for p in fr["points"]] == ["weights deleted", "answered", "final"]
    assert fr["points"][0].get("harmlessness") is None and fr["points"][1]["harmlessness"] is not None
    assert any("rl@1: its weights were deleted" in m and "frontier_keep_weights=true" in m for m in logs)


def test_frontier_switch_and_plan(tmp_path, tiny_model):
    """evaluate.frontier=false scores no point; the plan counts (points - 1) per stage of extra
    answers and comparisons with the initial model."""
    from cai.cost import PlanInputs
    from cai.inputs import load_inputs

    cfg = load_config(None, ["rl.steps=8", "rl.frontier_points=4", "stages=[prepare, rl, evaluate]",
                             "evaluate.max_prompts=2"])
    const, sets = load_inputs(cfg)
    count = lambda conv: 10  # noqa: E731
    with_points = ev.estimate(PlanInputs(cfg, const, sets, count))
    off = load_config(None, ["rl.steps=8", "rl.frontier_points=4", "stages=[prepare, rl, evaluate]",
                             "evaluate.max_prompts=2", "evaluate.frontier=false"])
    without = ev.estimate(PlanInputs(off, const, sets, count))
    assert frontier_extra(PlanInputs(cfg, const, sets, count)) == 3
    assert with_points.generate - without.generate == 3 * 6  # 3 points x 2 prompts x 3 sets
    # per point: comparisons (red + helpful, both orders), harmfulness, refusal (red + benign,
    # both orders), safe (red, both orders)
    assert with_points.score - without.score == 3 * ((2 + 2) * 2 + 2 + (2 + 2) * 2 + 2 * 2)
