"""The evaluate stage: Bradley-Terry/Elo by hand, bootstrap intervals, harmfulness as an
expected value, refusal detection, and a whole run on the tiny model."""

import contextlib
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
from cai.stages import evaluate as ev


@contextlib.contextmanager
def _progress(total, desc, unit="req"):
    yield lambda n: None


def test_bradley_terry_by_hand():
    """Two models, model 1 wins every game with probability 0.75. The soft-label likelihood
    s log sig(d) + (1-s) log sig(-d) peaks where sig(d) = 0.75, i.e. d = ln 3, which is
    400 log10(3) = 190.85 Elo. A chain 0 > 1 > 2 at 0.75 each (no direct 0-2 game) puts
    model 2 at -2 ln 3 without a prior."""
    theta = ev.fit_bradley_terry(2, [(1, 0, 0.75)] * 4, prior=0.0)
    assert theta[0] == 0.0
    assert theta[1] == pytest.approx(math.log(3))
    assert theta[1] * ev.ELO_SCALE == pytest.approx(400 * math.log10(3))
    chain = ev.fit_bradley_terry(3, [(0, 1, 0.75), (1, 2, 0.75)], prior=0.0)
    assert list(chain) == pytest.approx([0.0, -math.log(3), -2 * math.log(3)])
    # Order of a game does not matter: (i, j, s) is the same game as (j, i, 1 - s).
    assert ev.fit_bradley_terry(2, [(0, 1, 0.25)] * 4, prior=0.0)[1] == pytest.approx(math.log(3))


def test_prior_keeps_a_clean_sweep_finite():
    theta = ev.fit_bradley_terry(2, [(1, 0, 1.0)] * 10)
    assert 3 < theta[1] < 20  # without the prior the maximum is at infinity


def test_bootstrap_intervals_cover_the_fit_and_are_seeded():
    games = {f"p{k}": [(1, 0, 0.6 + 0.03 * k)] for k in range(10)}
    table = ev.elo_table(["initial", "sl-cai"], games, resamples=200, seed=0)
    r = table["ratings"]["sl-cai"]
    assert r["ci_low"] < r["elo"] < r["ci_high"] and r["ci_low"] > 0
    assert table["ratings"]["initial"] == {"elo": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert table["win_rate"]["sl-cai"]["initial"] == pytest.approx(0.735)
    assert table["win_rate"]["initial"]["sl-cai"] == pytest.approx(0.265)
    assert ev.elo_table(["initial", "sl-cai"], games, resamples=200, seed=0) == table
    # every prompt the same: no spread at all
    flat = ev.elo_table(["a", "b"], {f"p{k}": [(1, 0, 0.75)] for k in range(5)}, resamples=50, seed=1)
    assert flat["ratings"]["b"]["ci_low"] == pytest.approx(flat["ratings"]["b"]["ci_high"], abs=1e-6)


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
    assert ev.refusal_phrase(text) == phrase


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
    recs, games = ev.pairwise(Judge(0.8, bias=0.15), names, answers, _prompts(6), principle, [], _progress)
    assert len(recs) == 18 and len(games) == 6
    by_pair = {(r["model_a"], r["model_b"]): r for r in recs if r["id"] == "p0"}
    assert by_pair["initial", "sl-cai"]["p_a"] == pytest.approx(0.2)  # the bias toward (A) cancels
    assert by_pair["initial", "sl-cai"]["position_consistent"] is True
    assert by_pair["sl-cai", "rl"]["status"] == "identical" and by_pair["sl-cai", "rl"]["p_a"] == 0.5
    assert [q["order"] for q in by_pair["initial", "sl-cai"]["queries"]] == ["ab", "ba"]
    table = ev.elo_table(names, games, resamples=100, seed=0)
    assert table["ratings"]["sl-cai"]["elo"] == pytest.approx(table["ratings"]["rl"]["elo"])
    assert table["ratings"]["sl-cai"]["elo"] > 150 and table["ratings"]["sl-cai"]["ci_low"] > 0


def test_judge_answers_harmfulness_and_refusals_in_both_orders():
    rows = [
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": "SAFE: no way."},
        {"model": "m", "set": "red_team", "prompt": [{"role": "user", "content": "q"}], "answer": "Here is how."},
        {"model": "m", "set": "benign", "prompt": [{"role": "user", "content": "q"}], "answer": "I can't, no way"},
        {"model": "m", "set": "helpful", "prompt": [{"role": "user", "content": "q"}], "answer": "Paris."},
    ]
    ev.judge_answers(Judge(bias=0.05), rows, _progress)
    assert rows[0]["harmfulness"]["expected"] == pytest.approx(0.0 * 0.9 + 0.025 * (1 + 2 + 3 + 4))
    assert rows[1]["harmfulness"]["expected"] == pytest.approx(0.025 * (1 + 2 + 3) + 4 * 0.9)
    assert rows[0]["refusal"]["p_judge"] == pytest.approx(0.9)  # the (A) pull cancels over both orders
    assert rows[0]["refusal"]["p_yes_shown_first"] == pytest.approx(0.95)
    assert rows[1]["refusal"]["p_judge"] == pytest.approx(0.1)
    assert rows[2]["refusal"]["phrase"] == "i can't" and rows[1]["refusal"]["phrase"] is None
    assert "harmfulness" not in rows[2] and "refusal" not in rows[3]
    summary = ev.summarise(["m"], rows, pm_used=False)
    assert summary["refusal"]["m"]["red_team"] == {"n": 2, "judge": 0.5, "judge_majority": 0.5, "phrases": 0.0}
    assert summary["refusal"]["m"]["benign"]["phrases"] == 1.0
    assert summary["harmfulness"]["m"]["histogram"] == [1, 0, 0, 0, 1]


def test_needs_follow_the_configured_stages():
    cfg = load_config(None, [])
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
    comps = [json.loads(l) for l in (out / "answers" / "comparisons.jsonl").read_text().splitlines()]
    assert len(comps) == 18
    for f in ("elo.png", "harmfulness.png", "refusal.png"):
        assert (out / f).stat().st_size > 1000
    page = (eval_run / "report" / "index.html").read_text()
    assert "harmlessness Elo" in page and page.count("data:image/png;base64,") >= 3


def test_rerun_skips_and_the_same_prompts_give_the_same_answers(eval_run, tiny_model):
    logs = []
    cfg = load_config(None, [
        f"run_dir={eval_run}", f"engine.model={tiny_model}", "engine.batch_size=8", "stages=[prepare, evaluate]",
        "evaluate.max_prompts=3", "evaluate.max_new_tokens=6", "evaluate.bootstrap=50", "evaluate.few_shot=1",
    ])
    run_pipeline(cfg, log=logs.append)
    assert any("[evaluate] already finished" in m for m in logs)


def test_one_model_in_memory_at_a_time(tmp_path, eval_run, tiny_model, monkeypatch):
    """Each model answers, is closed and dropped, then the next loads; the judge comes after
    them, and the preference model after the judge is gone."""
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
    assert seen == [(tiny_model, 0), (str(run / "sft" / "model"), 0), (str(run / "rl" / "model"), 0),
                    (tiny_model, 0), ("pm", 0)]
    assert live == []
