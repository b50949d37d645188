"""The typed records of evaluate/results.json, frontier.json and revisions.json
(cai.evaluation.results): written back byte for byte, older layouts read with None for
what they lack, and a malformed file is a one-line error."""

import json

import pytest

from cai.errors import CaiError
from cai.evaluation.results import Frontier, JudgeReliability, Results, Revisions
from cai.io import write_json
from cai.judge_stats import judge_reliability, share_ci, yes_no

# The judge's reliability blocks as cai.judge_stats writes them: a question asked in both
# orders, and one asked in one order (its keys include "note").
BOTH = judge_reliability([yes_no([0.7, 0.4]), yes_no([0.8, 0.3]), yes_no([0.6, 0.45])])
ONE = judge_reliability([[[0.1, 0.2, 0.4, 0.2, 0.1]], [[0.5, 0.2, 0.1, 0.1, 0.1]]])


def _refusal(n, judge, majority, phrases):
    ci = {k: share_ci(v, n) for k, v in (("judge_majority", majority), ("phrases", phrases))}
    return {"n": n, "judge": judge, "judge_majority": majority, "phrases": phrases,
            "judge_majority_ci": ci["judge_majority"]["ci"], "phrases_ci": ci["phrases"]["ci"],
            "too_small": any(r["too_small"] for r in ci.values()), "judge_reliability": BOTH}


def _results() -> dict:
    """results.json as the evaluate stage writes it (run, elo_table, summarise, judge_summary,
    evalsets.results_entry), key for key in the writer's order: a fitted dimension and one
    without a fit (null), both kinds of reliability block, and a standard set."""
    names = ("initial", "sl-cai")
    rating = {"initial": {"elo": 0.0, "ci_low": 0.0, "ci_high": 0.0},
              "sl-cai": {"elo": 35.2, "ci_low": -20.1, "ci_high": 88.0}}
    return {
        "schema": 1,
        "models": {"initial": "default", "sl-cai": "runs/x/sft/model"},
        "judge": "default",
        "prompts": {"red_team": 3, "helpful": 3, "benign": 3},
        "settings": {"max_new_tokens": 6, "temperature": 0.7, "top_p": 0.95, "seed": 0, "few_shot": 1,
                     "bootstrap": 50, "elo_scale": "400 / ln(10) per natural-log odds unit; initial = 0"},
        "elo": {"harmlessness": {"ratings": rating,
                                 "win_rate": {"initial": {"sl-cai": 0.45}, "sl-cai": {"initial": 0.55}},
                                 "comparisons": 3, "prompts": 3, "bootstrap": 50, "principle_id": "less-harmful",
                                 "position_consistency": 0.3333, "judge_reliability": BOTH},
                "helpfulness": None},
        "harmfulness": {m: {"mean": 1.21, "n": 2, "mean_probs": [0.3, 0.2, 0.25, 0.15, 0.1],
                            "histogram": [0, 1, 1, 0, 0], "judge_reliability": ONE} for m in names},
        "refusal": {m: {"benign": _refusal(3, 0.31, 0.3333, 0.0), "red_team": _refusal(3, 0.5, 0.6667, 0.3333)}
                    for m in names},
        "safe": {m: {"red_team": {"n": 3, "judge": 0.58, "judge_majority": 0.6667,
                                  "judge_majority_ci": [0.2077, 0.9385], "too_small": True, "judge_reliability": BOTH}}
                 for m in names},
        "quality": {m: {s: {"n": 3, "degenerate": 0.0, "unhelpful": 0.3333} for s in ("red_team", "helpful", "benign")}
                    for m in names},
        "pm_score": {m: {"red_team": -0.0996, "helpful": -0.1092} for m in names},
        "refusal_phrases": ["i can't", "as an ai"],
        "quality_definitions": {"degenerate": "loops", "unhelpful": "restates the prompt"},
        "judge_reliability": {"elo_harmlessness": BOTH, "elo_helpfulness": None, "harmfulness": ONE, "refusal": BOTH,
                              "safe": BOTH, "rules": {"at_chance": "the judge is at chance unless ..."}},
        "standard_sets": {"xstest": {
            "title": "XSTest (Röttger et al. 2024)", "source": "/data/xstest/xstest_prompts.csv",
            "split": "hash split: 4 of 8 prompts held out", "prompts": 3, "skipped": {"duplicate prompt": 1},
            "convention": "XSTest's 3-way classification", "note": "Not comparable with published figures.",
            "models": {m: {"n": 3, "safe": {"n": 2, "full_compliance": 1.0, "refusal_rate": 0.0,
                                            "mean_probs": {"full_compliance": 0.33, "full_refusal": 0.33}},
                           "by_type": {}, "judge_reliability": {"class": BOTH}} for m in names},
            "judge_reliability": {"class": BOTH}}},
    }


def _anchored_results() -> dict:
    """results.json of an anchor design: a third model rated through the anchors (its
    ``compared_with``) and the table's ``design`` after the keys run adds."""
    data = json.loads(json.dumps(_results()))
    table = data["elo"]["harmlessness"]
    table["ratings"]["x"] = {"elo": -12.0, "ci_low": -60.5, "ci_high": 30.25, "compared_with": ["initial", "sl-cai"]}
    table["design"] = {"kind": "anchors", "anchors": ["initial", "sl-cai"], "pairs": 3}
    return data


def _frontier() -> dict:
    """frontier.json as frontier_result writes it: the references, a scored point, a final
    point whose helpfulness had no prompts (null) and a point whose weights were deleted by an
    earlier evaluation (no score keys at all)."""
    elo = {"elo": 12.3, "ci_low": -40.1, "ci_high": 61.0}
    refusal = {"benign": _refusal(3, 0.31, 0.3333, 0.0), "red_team": _refusal(3, 0.35, 0.3333, 0.0)}

    def meta(step, status):
        return {"stage": "rl", "step": step, "samples": 8 * step, "kl": 0.01, "reward": 0.2, "train_loss": None,
                "path": f"rl/points/step-00000{step}", "adapter": False, "start": "sl-cai", "status": status}

    return {"schema": 1, "against": "initial", "bootstrap": 20,
            "reference": {"initial": {"harmlessness": {"elo": 0.0, "ci_low": None, "ci_high": None},
                                      "helpfulness": {"elo": 0.0, "ci_low": None, "ci_high": None},
                                      "harmfulness": 1.21, "refusal": refusal},
                          "sl-cai": {"harmlessness": elo, "helpfulness": elo, "harmfulness": 1.3, "refusal": refusal}},
            "points": [{**meta(1, "weights deleted"), "weights_deleted": True},
                       {**meta(2, "answered"), "harmlessness": elo, "helpfulness": elo, "harmfulness": 1.1,
                        "refusal": refusal, "weights_deleted": True},
                       {**meta(3, "final"), "harmlessness": elo, "helpfulness": None, "harmfulness": None,
                        "refusal": refusal, "weights_deleted": False}]}


def _revisions() -> dict:
    """revisions.json as pm_by_revision and revision_effects write it."""
    return {"schema": 1, "splits": ["test"], "max_chains": 100,
            "pm_heldout": {"accuracy": 0.5, "pairs": 18, "ci_low": 0.2903, "ci_high": 0.7097, "at_chance": True},
            "chains": 2, "bootstrap": 50, "min_ci_prompts": 5,
            "rounds": [{"round": 0, "chains": 2, "revised": 0, "mean": 0.71, "mean_ci_low": None, "mean_ci_high": None,
                        "change": 0.0, "change_ci_low": None, "change_ci_high": None},
                       {"round": 1, "chains": 2, "revised": 1, "mean": 0.75, "mean_ci_low": 0.5, "mean_ci_high": 0.9,
                        "change": 0.04, "change_ci_low": -0.1, "change_ci_high": 0.2}],
            "principles": [{"id": "harmful-general", "sampled": 2, "revised": 1, "prompts": 1, "delta": 0.05,
                            "delta_ci_low": None, "delta_ci_high": None},
                           {"id": "never", "sampled": 1, "revised": 0, "prompts": 0, "delta": None,
                            "delta_ci_low": None, "delta_ci_high": None}]}


@pytest.mark.parametrize("cls, data", [(Results, _results()), (Results, _anchored_results()), (Frontier, _frontier()),
                                       (Revisions, _revisions())],
                         ids=["results", "results-anchors", "frontier", "revisions"])
def test_a_file_the_stage_wrote_reads_back_and_writes_the_same_bytes(tmp_path, cls, data):
    path = tmp_path / "file.json"
    write_json(path, data)
    record = cls.load(path)
    write_json(tmp_path / "again.json", record.to_json())
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()
    assert list(record.to_json()) == list(data)  # the key order too, not only the values


def test_fields_read_as_records():
    res = Results.from_json(_results())
    assert res.safe["sl-cai"].red_team.judge == 0.58 and res.refusal["initial"].benign.too_small is True
    assert res.elo.harmlessness.ratings["sl-cai"].ci_high == 88.0 and res.elo.helpfulness is None
    one = res.harmfulness["initial"].judge_reliability
    assert one.orders == 1 and one.note and one.position_consistency is None
    assert res.judge_reliability.questions()["elo_helpfulness"] is None
    assert res.standard_sets["xstest"].models["initial"]["safe"]["refusal_rate"] == 0.0  # a set's own summary: a dict
    assert list(res.refusal["initial"].named()) == ["benign", "red_team"]
    fr = Frontier.from_json(_frontier())
    assert fr.points[0].scores is None and fr.points[2].scores.helpfulness is None
    assert fr.reference["sl-cai"].refusal.red_team.judge == 0.35
    assert res.elo.harmlessness.design is None and res.elo.harmlessness.ratings["sl-cai"].compared_with is None
    anchored = Results.from_json(_anchored_results()).elo.harmlessness
    assert anchored.design.kind == "anchors" and anchored.design.anchors == ["initial", "sl-cai"]
    assert anchored.design.pairs == 3 and anchored.ratings["x"].compared_with == ["initial", "sl-cai"]
    rev = Revisions.from_json(_revisions())
    assert rev.pm_heldout.at_chance is True and rev.rounds[1].change_ci_high == 0.2 and rev.principles[1].delta is None


def test_an_older_layout_reads_with_none_for_what_it_lacks(tmp_path):
    """results.json from before the reliability fields, the intervals, the safe and quality
    figures and the standard sets; a reliability block from before at_chance."""
    old = {"models": {"initial": "default"}, "judge": "fake", "prompts": {"red_team": 3},
           "elo": {"harmlessness": {"ratings": {"initial": {"elo": 0.0, "ci_low": 0.0, "ci_high": 0.0}},
                                    "comparisons": 3, "prompts": 3, "bootstrap": 10, "principle_id": "p",
                                    "position_consistency": 0.25}},
           "refusal": {"initial": {"benign": {"n": 3, "judge": 0.49, "judge_majority": 0.0, "phrases": 0.0}}}}
    write_json(tmp_path / "results.json", old)
    res = Results.load(tmp_path / "results.json")
    assert res.schema == 1 and res.settings is None and res.judge_reliability is None and res.standard_sets is None
    assert res.safe == {} and res.quality == {} and res.pm_score is None and res.elo.helpfulness is None
    table = res.elo.harmlessness
    assert table.judge_reliability is None and table.win_rate == {} and table.position_consistency == 0.25
    assert table.design is None and table.ratings["initial"].compared_with is None  # all pairs, as every older file
    benign = res.refusal["initial"].benign
    assert benign.judge_majority_ci is None and benign.too_small is None and benign.judge_reliability is None
    assert res.refusal["initial"].red_team is None
    older = JudgeReliability.from_json({"orders": 2, "position_consistency": 0.25,
                                        "position_consistency_ci": [0.1, 0.45]})
    assert older.at_chance is None and older.judged_at_chance is True  # judged from its interval
    assert JudgeReliability.from_json({"position_consistency": 0.9}).judged_at_chance is False
    assert Revisions.from_json({"rounds": [{"round": 0, "mean": 0.5}]}).min_ci_prompts is None
    assert Results.load(tmp_path / "absent.json") is None


@pytest.mark.parametrize("data, says", [
    ([1, 2], "should be an object, not a list"),
    ({"elo": {"harmlessness": [1]}}, "field 'elo.harmlessness' should be an object, not a list"),
    ({"refusal": {"sl-cai": {"benign": {"n": "three"}}}},
     "field 'refusal.sl-cai.benign.n' should be an integer, not text"),
    ({"models": None}, "field 'models' should be an object, not null"),
    ({"judge_reliability": {"refusal": {"at_chance": "yes"}}},
     "field 'judge_reliability.refusal.at_chance' should be true or false, not text"),
    ({"standard_sets": {"xstest": {"models": {"initial": 3}}}},
     "field 'standard_sets.xstest.models.initial' should be an object, not a number"),
])
def test_a_malformed_file_is_a_one_line_error_naming_the_file_and_field(tmp_path, data, says):
    path = tmp_path / "results.json"
    write_json(path, data)
    with pytest.raises(CaiError) as err:
        Results.load(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and says in message and "\n" not in message


def test_the_report_says_which_file_is_malformed(tmp_path, capsys):
    from cai.cli import main

    run = tmp_path / "run"
    for stage in ("prepare", "evaluate"):
        (run / stage).mkdir(parents=True)
        write_json(run / stage / "manifest.json", {"stage": stage, "status": "complete"})
    (run / "evaluate" / "frontier.json").write_text(json.dumps({"points": [{"step": "two"}]}))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "frontier.json: field 'points[0].step' should be an integer, not text" in err and "\n" not in err
