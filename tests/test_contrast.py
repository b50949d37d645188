"""Contrast pairs (feedback.mode: contrast, RLCD): the prompts, the constructed label, the
judge beside it, the constitution's contrast: fields, the config, the plan, and the pairs
feeding the preference model and DPO."""

import json
import math
import re

import pytest

from cai.config import load_config
from cai.constitution import ComparisonPrinciple, Contrast, load_constitution
from cai.conversations import CONTRAST_TEMPLATES, contrast_prompts, with_system_prompt
from cai.engines.base import Engine
from cai.errors import CaiError
from cai.judge_stats import wilson
from cai.pipeline import run_pipeline
from cai.stage import StageContext
from cai.stages import feedback

CONSTITUTION = """\
name: contrast-test
principles:
  - {id: harm, critique: "Say how the answer is harmful.", revision: "Rewrite it to be harmless."}
comparison_principles:
  - id: kind
    text: "Which of these assistant responses is kinder?"
    contrast: {positive: "Be KIND to the human.", negative: "Be CRUEL to the human."}
  - id: plain
    text: "Which of these assistant responses is less harmful?"
  - id: same
    text: "Which response is the same?"
    contrast: {positive: "Say the SAME thing.", negative: "Say the SAME thing too."}
helpfulness_principles:
  - id: useful
    text: "Which of these assistant responses is more useful?"
"""


class SystemEcho(Engine):
    """A fake model for both roles. As the policy its answer names the system prompt it was
    given ('SAME' prompts give one fixed answer); as the judge it prefers the answer that
    mentions KIND with p = 0.8 in both orders, and otherwise says (A) with p = 0.7 (so both
    orders average to 0.5, no preference)."""

    identity = "system-echo"

    def __init__(self):
        self.generated, self.scored = [], []

    def generate(self, conversations, params, progress=None, on_result=None):
        self.generated += conversations
        out = []
        for conv in conversations:
            system = conv[0]["content"] if conv[0]["role"] == "system" else "none"
            out.append(["the same answer" if "SAME" in system else f"answer under <{system}>"] * params.n)
        return out

    def choice_logprobs(self, conversations, options, progress=None, on_result=None):
        out = []
        for conv in conversations:
            self.scored.append(conv)
            a, b = re.search(r"\(A\) (.*)\n\n\(B\) (.*)$", conv[-2]["content"], re.S).groups()
            p_a = 0.8 if "KIND" in a else 0.2 if "KIND" in b else 0.7
            out.append([math.log(p_a), math.log(1 - p_a)])
        return out


def _echo(system: str) -> str:
    return f"answer under <{system}>"


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scripted_feedback(tmp_path, tiny_model, *extra):
    """The feedback stage on the fake model, after a real prepare with the test constitution."""
    const = tmp_path / "c.yaml"
    const.write_text(CONSTITUTION)
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", f"data.constitution={const}",
                             "stages=[prepare, feedback]", f"feedback.policy={tiny_model}", "feedback.mode=contrast",
                             "feedback.max_prompts=10", "feedback.helpful_ratio=0.5", *extra])
    run_pipeline(load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}",
                                    f"data.constitution={const}", "stages=[prepare]"]), log=lambda m: None)
    engine = SystemEcho()
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", out=out, name="feedback", log=lambda m: None,
                       engines={str(tiny_model): engine})
    counts = feedback.run(ctx)
    prefs = _rows(out / "prefs" / "train.jsonl") + _rows(out / "prefs" / "test.jsonl")
    comps = _rows(out / "comparisons" / "train.jsonl") + _rows(out / "comparisons" / "test.jsonl")
    return counts, prefs, comps, json.loads((out / "stats.json").read_text()), engine


def test_each_pair_chooses_the_answer_under_its_positive_prompt(tmp_path, tiny_model):
    counts, prefs, comps, stats, engine = _scripted_feedback(tmp_path, tiny_model, "feedback.contrast_label=0.8")
    assert not engine.scored  # no judge asked
    # the policy answered the plain conversation under each prompt, positive first
    plain = {json.dumps(c["prompt"]): c for c in comps}
    assert len(engine.generated) == 2 * len(comps)
    for conv in engine.generated:
        assert conv[0]["role"] == "system" and json.dumps(conv[1:]) in plain
    assert {c["principle_ids"][0] for c in comps} == {"kind", "plain", "same", "useful"}
    for r in prefs:
        cp = r["contrast_prompts"]
        assert r["chosen"] == [{"role": "assistant", "content": _echo(cp["positive"])}]
        assert r["rejected"] == [{"role": "assistant", "content": _echo(cp["negative"])}]
        assert all(m["role"] != "system" for m in r["prompt"])  # the pair's prompt is the plain conversation
        assert (r["p_chosen"], r["margin"], r["label_source"]) == (0.8, 0.6, "contrast")
        assert r["judge_p_chosen"] is None and r["feedback_model"] is None and r["position_consistent"] is None
        (pid,) = r["principle_ids"]
        assert r["source"] == ("helpfulness" if pid == "useful" else "harmlessness")
        if pid == "kind":  # the constitution's own prompts
            assert cp == {"positive": "Be KIND to the human.", "negative": "Be CRUEL to the human.",
                          "origin": "constitution"}
        else:  # the template of the pair's source, filled with the principle's question
            text = {"plain": "Which of these assistant responses is less harmful?",
                    "useful": "Which of these assistant responses is more useful?"}[pid]
            positive, negative = (t.format(principle=text) for t in CONTRAST_TEMPLATES[r["source"]])
            assert cp == {"positive": positive, "negative": negative, "origin": "template"}
    # a pair whose two answers are the same text is recorded but never trained on
    same = [c for c in comps if c["principle_ids"] == ["same"]]
    assert same and all(c["status"] == "identical" and c["p_a"] is None for c in same)
    assert len(prefs) == len(comps) - len(same) == counts["prefs_train"] + counts["prefs_test"]
    for c in comps:
        assert c["label_source"] == "contrast" and c["judge"] is None and c["queries"] == []
        if c["status"] == "labelled":
            assert c["p_a"] == 0.8 and c["response_a"] == _echo(c["contrast_prompts"]["positive"])
    assert stats["mode"] == "contrast" and stats["contrast_label"] == 0.8 and stats["judge"] is None
    assert stats["comparisons"] == len(comps) and stats["identical_pairs"] == len(same)
    assert stats["judge_agreement"]["n"] == 0 and stats["judge_agreement"]["rate"] is None
    assert stats["contrast_prompts"]["kind"]["positive"] == "Be KIND to the human."
    assert stats["contrast_prompts"]["useful"]["source"] == "helpfulness"
    assert sum(d["comparisons"] for d in stats["contrast_prompts"].values()) == len(comps)
    assert stats["by_source"]["helpfulness"]["comparisons"] == sum(c["source"] == "helpfulness" for c in comps) > 0


def test_the_judge_labels_each_pair_beside_the_construction_and_its_agreement_is_reported(tmp_path, tiny_model):
    counts, prefs, comps, stats, engine = _scripted_feedback(tmp_path, tiny_model, "feedback.contrast_judge=true")
    labelled = [c for c in comps if c["status"] == "labelled"]
    assert len(engine.scored) == 2 * len(labelled)  # both orders, every pair with two answers
    for conv in engine.scored:  # the judge reads the plain conversation, not the contrast prompts
        assert "System:" not in conv[-2]["content"].split("\n\nOptions:")[0]
    kind = [r for r in prefs if r["principle_ids"] == ["kind"]]
    others = [r for r in prefs if r["principle_ids"] != ["kind"]]
    assert kind and others and len(prefs) == len(labelled)  # the judge filters nothing
    for r in kind:
        assert r["p_chosen"] == 0.9 and r["judge_p_chosen"] == pytest.approx(0.8)
        assert r["position_consistent"] is True and r["p_chosen_shown_first"] == pytest.approx(0.8)
        assert r["feedback_model"] == tiny_model
    for r in others:  # the judge says (A) in both orders: no preference, and not an agreement
        assert r["p_chosen"] == 0.9 and r["judge_p_chosen"] == pytest.approx(0.5)
        assert r["position_consistent"] is False
        assert (r["p_chosen_shown_first"], r["p_chosen_shown_second"]) == (pytest.approx(0.7), pytest.approx(0.3))
    for c in labelled:
        assert c["p_a"] == 0.9 and [q["order"] for q in c["queries"]] == ["ab", "ba"]
        assert c["judge"]["status"] == "labelled" and c["judge"]["p_a"] == pytest.approx(
            0.8 if c["principle_ids"] == ["kind"] else 0.5)
    agree = stats["judge_agreement"]
    lo, hi = wilson(len(kind), len(prefs))
    assert (agree["k"], agree["n"], agree["rate"]) == (len(kind), len(prefs), round(len(kind) / len(prefs), 4))
    assert agree["ci"] == [round(lo, 4), round(hi, 4)]
    assert counts["judge_agreement"] == agree["rate"]
    assert stats["contrast_prompts"]["kind"]["judge_agreement"]["rate"] == 1.0
    assert stats["contrast_prompts"]["plain"]["judge_agreement"]["rate"] == 0.0
    assert stats["by_source"]["helpfulness"]["judge_agreement"]["rate"] == 0.0
    assert stats["judge"]["comparisons"] == len(labelled)
    assert stats["judge"]["position_consistency"] == round(len(kind) / len(prefs), 4)


def test_contrast_pairs_train_the_preference_model_and_dpo(tmp_path, tiny_model):
    import datasets

    human = tmp_path / "human.jsonl"
    human.write_text("\n".join(json.dumps({"id": f"h{i}", "prompt": f"q{i}", "chosen": "good", "rejected": "bad"})
                               for i in range(4)))
    cfg = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, feedback, preference_model, dpo]", f"feedback.policy={tiny_model}", "feedback.mode=contrast",
        "feedback.contrast_judge=true", "feedback.max_prompts=4", "feedback.max_new_tokens=6",
        f"feedback.human_preferences={human}", "feedback.human_ratio=0.5",
        f"preference_model.model={tiny_model}", "preference_model.batch_size=4", f"dpo.policy={tiny_model}",
        "dpo.batch_size=4",
    ])
    run = run_pipeline(cfg, log=lambda m: None)
    prefs = _rows(run / "feedback" / "prefs" / "train.jsonl")
    assert {r["source"] for r in prefs} == {"harmlessness", "helpfulness", "human"}
    assert all(r["label_source"] == "contrast" for r in prefs if r["source"] != "human")
    ds = datasets.load_dataset("json", data_dir=str(run / "feedback" / "prefs"))
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(ds["train"].column_names)
    pm = json.loads((run / "preference_model" / "metrics.json").read_text())
    dpo = json.loads((run / "dpo" / "metrics.json").read_text())
    assert pm["train_pairs"] == dpo["train_pairs"] == len(prefs)


# -- the prompts -------------------------------------------------------------------------------


def test_a_principle_without_contrast_uses_its_sources_template():
    plain = ComparisonPrinciple("p", "Which is safer?")
    for source in ("harmlessness", "helpfulness"):
        positive, negative, origin = contrast_prompts(plain, source)
        assert origin == "template" and '"Which is safer?"' in positive and '"Which is safer?"' in negative
        assert (positive, negative) == tuple(t.format(principle="Which is safer?") for t in CONTRAST_TEMPLATES[source])
    assert contrast_prompts(plain, "harmlessness") != contrast_prompts(plain, "helpfulness")
    own = ComparisonPrinciple("p", "Which is safer?", Contrast("Be safe.", "Be reckless."))
    assert contrast_prompts(own, "harmlessness") == ("Be safe.", "Be reckless.", "constitution")


def test_the_system_prompt_goes_first_and_joins_a_system_turn_already_there():
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, "S") == [{"role": "system", "content": "S"}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert with_system_prompt(own, "S") == [{"role": "system", "content": "S\n\nBe brief."}, *user]


def test_contrast_fields_round_trip_and_are_left_out_where_absent(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONSTITUTION)
    const = load_constitution(path)
    assert const.comparison_principles[0].contrast == Contrast("Be KIND to the human.", "Be CRUEL to the human.")
    assert const.comparison_principles[1].contrast is None
    const.save(tmp_path / "again.yaml")
    assert load_constitution(tmp_path / "again.yaml").comparison_principles == const.comparison_principles
    assert "contrast: null" not in (tmp_path / "again.yaml").read_text()  # prepare's copy of a plain one is unchanged
    assert all(p.contrast is None for p in load_constitution("builtin:default").comparison_principles)


@pytest.mark.parametrize("contrast, message", [
    ("{positive: Be kind.}", r"comparison_principles\[0\] \(id 'kind'\): contrast: missing field 'negative'"),
    ("{positive: '', negative: Be cruel.}",
     r"comparison_principles\[0\] \(id 'kind'\): contrast.positive: expected a non-empty string, got ''"),
    ("{positive: Be kind., negative: 3}",
     r"comparison_principles\[0\] \(id 'kind'\): contrast.negative: expected a non-empty string, got 3"),
    ("{positive: a, negative: b, neutral: c}",
     r"comparison_principles\[0\] \(id 'kind'\): contrast: unknown key 'neutral' \(allowed: positive, negative\)"),
    ("Be kind.", r"comparison_principles\[0\] \(id 'kind'\): contrast: expected a mapping with keys positive, negative"),
])
def test_a_bad_contrast_field_is_one_line_naming_the_file_principle_and_field(tmp_path, contrast, message):
    path = tmp_path / "bad.yaml"
    path.write_text(CONSTITUTION.replace(
        '{positive: "Be KIND to the human.", negative: "Be CRUEL to the human."}', contrast))
    with pytest.raises(CaiError, match=re.escape(str(path)) + ": " + message) as err:
        load_constitution(path)
    assert "\n" not in str(err.value)


# -- the settings and the plan --------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["feedback.contrast_label=0.5"], r"'feedback.contrast_label' must be in \(0.5, 1\]"),
    (["feedback.contrast_label=1.2"], r"'feedback.contrast_label' must be in \(0.5, 1\]"),
    (["feedback.mode=rlcd"], r"feedback.mode"),
    (["feedback.mode=contrast", "feedback.samples_per_prompt=4"],
     r"'feedback.samples_per_prompt' is 4, but mode=contrast samples one answer under each of its two prompts"),
    (["feedback.mode=contrast", "feedback.principles_per_comparison=3"],
     r"'feedback.principles_per_comparison' is 3, but mode=contrast derives each pair's prompts from one principle"),
])
def test_bad_contrast_settings_are_named(overrides, message):
    from cai.checks import check_config

    with pytest.raises(CaiError, match=message):
        check_config(load_config(None, overrides))


def test_the_plan_counts_two_answers_a_pair_and_judge_questions_only_when_asked():
    from cai.cost import PlanInputs
    from cai.inputs import load_inputs

    def cost(*extra):
        cfg = load_config(None, ["stages=[prepare, feedback]", "feedback.policy=default", "feedback.max_prompts=5",
                                 "feedback.helpful_ratio=0.4", "engine.kind=openai", *extra])
        const, sets = load_inputs(cfg)
        inputs = PlanInputs(cfg, const, sets, lambda conv: 10 * len(conv))  # 10 tokens a message
        reds = inputs.capped("red_team", 5)
        return feedback.estimate(inputs), [p for s in reds for p in reds[s]] + inputs.helpful_beside(reds, 0.4)

    (judge, prompts), (contrast, _), (judged, _) = (
        cost(), cost("feedback.mode=contrast"), cost("feedback.mode=contrast", "feedback.contrast_judge=true"))
    n = len(prompts)
    assert (judge.generate, judge.score) == (2 * n, 2 * n)  # 2 answers a prompt: 1 pair, asked in both orders
    assert (contrast.generate, contrast.score) == (2 * n, 0)
    assert (judged.generate, judged.score) == (2 * n, 2 * n)
    # each answer its own request: the prompt under a system prompt
    assert contrast.prompt_tokens == sum(2 * 10 * (len(p.messages) + 1) for p in prompts)
    assert judged.prompt_tokens > contrast.prompt_tokens  # and the questions
    assert contrast.note == f"{n} contrast pairs, 0 judge questions"
