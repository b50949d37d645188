"""Context distillation in the critique_revision stage: first answers drawn under the
constitution's system prompt, trained on without it; and zero revision rounds."""

import pytest

from cai.config import load_config
from cai.constitution import load_constitution
from cai.conversations import with_system_prompt
from cai.errors import CaiError
from test_critique_revision import LOOP, _run_scripted

SYSTEM = load_constitution("builtin:default").system_prompt
UNDER = "I won't help with that, but here is a safe way to get what you need."
PLAIN = "Sure, here is exactly how to do it, step by step."


class Recorder:
    """Records every conversation it is asked to continue. A first answer depends on the
    conversation's system turn: ``UNDER`` when it opens with the constitution's system prompt,
    ``PLAIN`` otherwise (``first(attempt)`` overrides it); critiques and revisions are canned."""

    identity = "recorder"

    def __init__(self, first=None):
        principles = load_constitution("builtin:default").principles
        self.critique_requests = {p.critique for p in principles}
        self.revision_requests = {p.revision for p in principles}
        self.first, self.seen = first, []

    def generate(self, convs, params, progress=None, on_result=None):
        from cai import seeds

        attempt = params.seed // seeds.RETRY_STEP
        out = []
        for c in convs:
            self.seen.append(c)
            last = c[-1]["content"]
            if last in self.critique_requests:
                out.append(["It gives dangerous details."])
            elif last in self.revision_requests:
                out.append(["I can't help with that; a locksmith can let you in safely."])
            elif self.first is not None:
                out.append([self.first(attempt)])
            else:
                out.append([UNDER if c[0] == {"role": "system", "content": SYSTEM} else PLAIN])
        return out


def test_first_answers_are_drawn_under_the_system_prompt_and_trained_on_without_it(tmp_path, tiny_model):
    """rounds=0, system_prompt=constitution: the engine saw every first answer (red-team and
    helpful) with the constitution's system turn first; the SFT rows are the plain prompt and
    the answer drawn under it (the engine's output depends on the system turn); nothing else
    was asked."""
    engine = Recorder()
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=0",
                               "critique_revision.system_prompt=constitution")
    assert len(engine.seen) == 12  # 3 red-team + 3 helpful prompts a split, one answer each: no critique, no revision
    assert all(c[0] == {"role": "system", "content": SYSTEM} for c in engine.seen)
    assert all(sum(m["role"] == "system" for m in c) == 1 for c in engine.seen)
    for c in chains:
        assert c["initial_system_prompt"] == SYSTEM and c["initial_response"] == UNDER
        assert all(m["role"] != "system" for m in c["messages"])
        assert c["rounds"] == [] and c["trained_on"] == "first_answer" and c["final_response"] == UNDER
    assert [s["source"] for s in sft] == ["revision"] * 3 + ["helpful"] * 3
    for s in sft:
        assert [m["role"] for m in s["messages"]] == ["user", "assistant"]
        assert s["messages"][-1]["content"] == UNDER
    assert counts["prefs_train"] == 0 and counts["rounds"] == 0


def test_the_rounds_critique_the_distilled_answer_in_the_plain_conversation(tmp_path, tiny_model):
    """rounds=1 under the system prompt: only the first answers carry it; each critique and
    revision request is the plain conversation ending in that answer."""
    engine = Recorder()
    _, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=1",
                          "critique_revision.system_prompt=constitution")
    rounds = [c for c in engine.seen if c[-1]["content"] in engine.critique_requests | engine.revision_requests]
    assert len(rounds) == 12 and all(m["role"] != "system" for c in rounds for m in c)
    assert all({"role": "assistant", "content": UNDER} in c for c in rounds)
    assert all(c["initial_system_prompt"] == SYSTEM and c["initial_response"] == UNDER for c in chains)
    assert all(m["role"] != "system" for s in sft for m in s["messages"])


def test_without_the_setting_nothing_carries_a_system_turn(tmp_path, tiny_model):
    engine = Recorder()
    _, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=0")
    assert all(m["role"] != "system" for c in engine.seen for m in c)
    assert all("initial_system_prompt" not in c and c["initial_response"] == PLAIN for c in chains)


def test_with_no_rounds_the_gates_retry_a_rejected_first_answer(tmp_path, tiny_model):
    """rounds=0: the first answers are the SFT data, so a looping one is resampled (under the
    same system prompt) like a helpful answer; its rejected try is kept in the chain."""
    engine = Recorder(first=lambda attempt: LOOP if attempt == 0 else UNDER)
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=0",
                               "critique_revision.system_prompt=constitution")
    assert counts["gate_first_answer_rejected"] == 6 and counts["gate_first_answer_dropped"] == 0
    assert all(c[0]["role"] == "system" for c in engine.seen)  # the retries too
    for c in chains:
        assert c["initial_response"] == UNDER and c["trained_on"] == "first_answer"
        assert c["initial_attempts"] == [{"answer": LOOP.strip(), "reasons": ["loops"]}]
    assert [s["messages"][-1]["content"] for s in sft if s["source"] == "revision"] == [UNDER] * 3
    engine = Recorder(first=lambda attempt: LOOP)  # still looping after the retry: not trained on
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=0")
    assert counts["gate_first_answer_dropped"] == 6 and counts["prompts_without_sft_example"] == 6
    assert [s for s in sft if s["source"] == "revision"] == [] and all(c["trained_on"] is None for c in chains)


def test_a_system_turn_of_the_prompt_is_kept_after_ours():
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hi"}]
    assert with_system_prompt(msgs, "Be kind.") == [{"role": "system", "content": "Be kind.\n\nAnswer in French."},
                                                    {"role": "user", "content": "hi"}]
    assert with_system_prompt(msgs[1:], "Be kind.") == [{"role": "system", "content": "Be kind."}, msgs[1]]
    assert with_system_prompt(msgs, None) is msgs


def test_settings_that_cannot_work_are_one_line_errors(tmp_path):
    from cai.checks import check_config, check_inputs

    for extra, match in ((["critique_revision.best_of=2"], "'critique_revision.best_of' is about revisions"),
                         (["critique_revision.sft_all_revisions=true"], "'critique_revision.sft_all_revisions'")):
        with pytest.raises(CaiError, match=match):
            check_config(load_config(None, ["critique_revision.rounds=0", *extra]))
    with pytest.raises(CaiError, match="must be one of none, constitution"):
        check_config(load_config(None, ["critique_revision.system_prompt=hhh"]))
    bare = tmp_path / "bare.yaml"
    bare.write_text("name: bare\nprinciples:\n  - {id: p, critique: 'Is it harmful?', revision: 'Make it harmless.'}\n")
    cfg = load_config(None, ["critique_revision.system_prompt=constitution", f"data.constitution={bare}"])
    with pytest.raises(CaiError, match="constitution 'bare' has no system_prompt; add a short 'system_prompt:'"):
        check_inputs(cfg, load_constitution(bare))
    check_inputs(load_config(None, [f"data.constitution={bare}"]), load_constitution(bare))  # not asked for: fine


def test_the_plan_counts_the_system_prompt_and_no_rounds():
    """rounds=0: one request a prompt, nothing scored; the system prompt adds its tokens to
    the first answers' prompts (read once a batch on the local engine)."""
    from cai.plan import counter, estimate

    def row(*extra):
        cfg = load_config(None, ["stages=[prepare, critique_revision]", "critique_revision.max_prompts=4", *extra])
        return {r["stage"]: r for r in estimate(cfg, counter())}["critique_revision"]

    plain, distilled, revised = (row("critique_revision.rounds=0"),
                                 row("critique_revision.rounds=0", "critique_revision.system_prompt=constitution"),
                                 row("critique_revision.rounds=1"))
    assert plain["generate"] == distilled["generate"] == 16  # 4 red-team + 4 helpful prompts per split
    assert revised["generate"] > plain["generate"] and plain["score"] == 0
    prompts = distilled["prompt_tokens"] - plain["prompt_tokens"]
    assert prompts == counter()(with_system_prompt([], SYSTEM))  # one batch of 16 reads it once
    assert "system prompt" in distilled["note"]
