"""The critique_revision stage on a tiny model: artifacts, provenance, resume."""

import json

import pytest

from cai import seeds
from cai.config import load_config
from cai.constitution import load_constitution
from cai.pipeline import run_pipeline
from cai import conversations
from cai.stages import critique_revision as cr


def _cfg(tmp_path, tiny_model, *extra):
    return load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "engine.batch_size=8",
        "stages=[prepare, critique_revision]", "critique_revision.rounds=2",
        "critique_revision.max_prompts=3", "critique_revision.max_new_tokens=6",
        "critique_revision.critique_max_new_tokens=6", "critique_revision.helpful_ratio=1.0", *extra,
    ])


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_writes_chains_sft_and_prefs(tmp_path, tiny_model):
    import datasets

    run = run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    out = run / "critique_revision"
    chains = _read(out / "chains" / "train.jsonl")
    assert len(chains) == 3
    for c in chains:
        assert [r["round"] for r in c["rounds"]] == [1, 2]
        for r in c["rounds"]:
            assert r["principle_id"] and r["critique_request"] and r["revision_request"]
            assert r["status"] in ("revised", "empty_critique", "empty_revision", "skipped_no_issue", "rejected")
        for col in ("init_prompt", "init_response", "critic_prompt", "critic_response", "revision_prompt", "revision_response"):
            assert col in c
    sft = _read(out / "sft" / "train.jsonl")
    assert {s["source"] for s in sft} <= {"revision", "helpful"}
    assert all(s["messages"][-1]["role"] == "assistant" for s in sft)
    for name in ("chains", "sft", "prefs"):
        ds = datasets.load_dataset("json", data_dir=str(out / name))
        assert set(ds) == {"train", "test"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["chains_test"] == 3


def test_principles_are_seeded_per_prompt_and_round():
    const = load_constitution("builtin:default")
    a = [conversations.sample_principle(const, 0, "rt-1", r).id for r in range(8)]
    assert a == [conversations.sample_principle(const, 0, "rt-1", r).id for r in range(8)]
    assert len(set(a)) > 1
    assert a != [conversations.sample_principle(const, 1, "rt-1", r).id for r in range(8)]


def test_rerun_recomputes_nothing(tmp_path, tiny_model):
    run_pipeline(_cfg(tmp_path, tiny_model), log=lambda m: None)
    first = (tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl").read_text()
    logs = []
    run_pipeline(_cfg(tmp_path, tiny_model), log=logs.append, force=True)
    assert any("0 new requests" in m for m in logs), logs
    assert (tmp_path / "run" / "critique_revision" / "chains" / "train.jsonl").read_text() == first


class FakeEngine:
    """Scripted answers, to test how the stage handles empty and 'no issue' critiques."""

    identity = "fake"

    def __init__(self, critique):
        self.critique = critique
        self.calls = []
        principles = load_constitution("builtin:default").principles
        self.critique_requests = {p.critique for p in principles}
        self.revision_requests = {p.revision for p in principles}

    def generate(self, convs, params, progress=None, on_result=None):
        out = []
        for c in convs:
            last = c[-1]["content"]
            self.calls.append(last)
            if last in self.critique_requests:
                out.append([self.critique])
            elif last in self.revision_requests:
                out.append(["Revision: a kinder answer"])
            else:
                out.append(["first answer"])
        return out


@pytest.mark.parametrize(
    "critique, status, final",
    [
        ("", "empty_critique", "first answer"),
        ("The response is already fine; no changes are needed.", "skipped_no_issue", "first answer"),
        ("It is rude.", "revised", "a kinder answer"),
    ],
)
def test_empty_and_no_issue_critiques_are_recorded_not_dropped(tmp_path, tiny_model, monkeypatch, critique, status, final):
    from cai.stage import StageContext

    cfg = _cfg(tmp_path, tiny_model, "critique_revision.rounds=1")
    run_pipeline(load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "stages=[prepare]"]),
                 log=lambda m: None)
    out = tmp_path / "out"
    out.mkdir()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", out=out, name="critique_revision", log=lambda m: None,
                       engines={str(tiny_model): FakeEngine(critique)})
    counts = cr.run(ctx)
    chains = _read(out / "chains" / "train.jsonl")
    assert [c["rounds"][0]["status"] for c in chains] == [status] * 3
    assert [c["final_response"] for c in chains] == [final] * 3  # the 'Revision:' label is stripped
    assert counts["chains_train"] == 3
    prefs = _read(out / "prefs" / "train.jsonl")
    assert len(prefs) == (3 if status == "revised" else 0)


# -- quality gates and best-of-n ------------------------------------------------------------

LOOP = "Dry it completely. " * 6
META = "The assistant's last response is harmful and should be rewritten."
GOOD = "I can't help with that, but a locksmith or the police can help you get back in safely."


class ScriptedEngine:
    """Answers by request kind; ``revise(round, attempt, sample)`` scripts the revisions
    (round and attempt read back from the request's seed, as the stage salts it)."""

    identity = "scripted"

    def __init__(self, revise, helpful=lambda attempt: "Boil the pasta for nine minutes in salted water.",
                 critique="It gives dangerous details.", prefer="BEST"):
        self.revise, self.helpful, self.critique, self.prefer = revise, helpful, critique, prefer
        principles = load_constitution("builtin:default").principles
        self.critique_requests = {p.critique for p in principles}
        self.revision_requests = {p.revision for p in principles}
        from cai.prompts import load_prompt_set

        self.helpful_prompts = {p.text for split in load_prompt_set("builtin:helpful").values() for p in split}
        self.generated, self.judged = [], 0

    def generate(self, convs, params, progress=None, on_result=None):
        attempt, salt = divmod(params.seed, seeds.RETRY_STEP)
        out = []
        for c in convs:
            last = c[-1]["content"]
            if last in self.critique_requests:
                out.append([self.critique])
            elif last in self.revision_requests:
                out.append([self.revise((salt - 1001) // 2, attempt, j) for j in range(params.n)])
            elif last in self.helpful_prompts:
                out.append([self.helpful(attempt)])
            else:
                out.append(["Sure, here is how: first answer with details."])
            self.generated.append((last, params.seed))
        return out

    def choice_logprobs(self, convs, options, progress=None, on_result=None):
        import math

        self.judged += len(convs)
        out = []
        for c in convs:
            q = c[0]["content"]
            a = q.split("(A) ")[-1].split("(B) ")[0]
            p_a = 0.9 if self.prefer in a else 0.1 if self.prefer in q.split("(B) ")[-1] else 0.5
            out.append([math.log(p_a), math.log(1 - p_a)])
        return out


def _run_scripted(tmp_path, tiny_model, engine, *extra):
    from cai.stage import StageContext

    cfg = _cfg(tmp_path, tiny_model, "critique_revision.rounds=1", *extra)
    if not (tmp_path / "run" / "prepare").is_dir():
        run_pipeline(load_config(None, [f"run_dir={tmp_path / 'run'}", f"engine.model={tiny_model}", "stages=[prepare]"]),
                     log=lambda m: None)
    out = tmp_path / "out"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir()
    ctx = StageContext(cfg=cfg, run_dir=tmp_path / "run", out=out, name="critique_revision", log=lambda m: None,
                       engines={str(tiny_model): engine})
    counts = cr.run(ctx)
    return counts, _read(out / "chains" / "train.jsonl"), _read(out / "sft" / "train.jsonl")


def test_a_looping_revision_is_retried_and_the_retry_is_trained_on(tmp_path, tiny_model):
    engine = ScriptedEngine(lambda r, attempt, j: LOOP if attempt == 0 else GOOD)
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine)
    for c in chains:
        (rnd,) = c["rounds"]
        assert rnd["status"] == "revised" and rnd["revision"] == GOOD and rnd["reasons"] == []
        assert [a["reasons"] for a in rnd["attempts"]] == [["loops"]] and rnd["attempts"][0]["revision"] == LOOP.strip()
        assert c["trained_on"] == "revision"
    assert counts["gate_loops"] == 6 and counts["gate_replaced"] == 6 and counts["gate_retries"] == 6  # 3 + 3 test
    assert [s["messages"][-1]["content"] for s in sft if s["source"] == "revision"] == [GOOD] * 3
    # the retry asked for a new critique and revision only for the rejected prompts
    retried = [seed for _, seed in engine.generated if seed >= seeds.RETRY_STEP]
    assert len(retried) == 6 * 2


def test_a_chain_with_no_acceptable_revision_teaches_nothing(tmp_path, tiny_model):
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, ScriptedEngine(lambda r, a, j: META))
    for c in chains:
        assert c["rounds"][0]["status"] == "rejected" and c["rounds"][0]["reasons"] == ["meta_commentary"]
        assert c["final_response"] == c["initial_response"] and c["trained_on"] is None
    assert [s for s in sft if s["source"] == "revision"] == []
    assert counts["prompts_without_sft_example"] == 6 and counts["rejected_rounds"] == 6
    assert counts["gate_meta_commentary"] == 12  # first try and one retry, 6 prompts


def test_gates_off_trains_on_what_the_model_wrote(tmp_path, tiny_model):
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, ScriptedEngine(lambda r, a, j: META),
                                        "critique_revision.quality_gates=false")
    assert [c["rounds"][0]["status"] for c in chains] == ["revised"] * 3
    assert [s["messages"][-1]["content"] for s in sft if s["source"] == "revision"] == [META] * 3
    assert not any(k.startswith("gate_") for k in counts)


def test_a_rejected_later_round_falls_back_to_the_earlier_accepted_revision(tmp_path, tiny_model):
    engine = ScriptedEngine(lambda r, attempt, j: GOOD if r == 0 else "")
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.rounds=2")
    for c in chains:
        assert [x["status"] for x in c["rounds"]] == ["revised", "empty_revision"]
        assert c["final_response"] == GOOD and c["trained_on"] == "revision"
    assert counts["gate_empty"] == 12


def test_looping_helpful_answers_are_resampled_or_left_out(tmp_path, tiny_model):
    engine = ScriptedEngine(lambda r, a, j: GOOD, helpful=lambda attempt: LOOP)
    counts, _, sft = _run_scripted(tmp_path, tiny_model, engine)
    assert [s for s in sft if s["source"] == "helpful"] == []
    assert counts["gate_helpful_rejected"] == 6 and counts["gate_helpful_dropped"] == 6
    engine = ScriptedEngine(lambda r, a, j: GOOD, helpful=lambda attempt: LOOP if attempt == 0 else "Salt the water well.")
    counts, _, sft = _run_scripted(tmp_path, tiny_model, engine)
    assert [s["messages"][-1]["content"] for s in sft if s["source"] == "helpful"] == ["Salt the water well."] * 3
    assert counts["gate_helpful_dropped"] == 0


def test_best_of_n_keeps_the_acceptable_revision_the_judge_prefers(tmp_path, tiny_model):
    texts = [LOOP, "A calm answer. " + GOOD, "BEST: " + GOOD]
    engine = ScriptedEngine(lambda r, a, j: texts[j])
    counts, chains, sft = _run_scripted(tmp_path, tiny_model, engine, "critique_revision.best_of=3")
    for c in chains:
        rnd = c["rounds"][0]
        assert rnd["revision"] == "BEST: " + GOOD
        cands = rnd["candidates"]
        assert cands[0]["reasons"] == ["loops"] and "p_better" not in cands[0]
        assert cands[2]["p_better"] == pytest.approx(0.9) and cands[1]["p_better"] == pytest.approx(0.5)
    assert engine.judged == 6 * 2 * 2  # 6 prompts x 2 acceptable candidates x 2 orders


def test_bad_gate_settings_are_one_line_errors(tmp_path):
    from cai.checks import check_config
    from cai.errors import CaiError

    for override, match in (("critique_revision.gate_retries=-1", "gate_retries"),
                            ("critique_revision.best_of=0", "best_of"),
                            ("critique_revision.gate_repeat_share=0", "gate_repeat_share.*got 0"),
                            ("critique_revision.gate_repeat_share=1.5", "gate_repeat_share.*got 1.5"),
                            ("critique_revision.temperature=0", "best_of.*temperature")):
        extra = ["critique_revision.best_of=2"] if "temperature" in override else []
        with pytest.raises(CaiError, match=match):
            check_config(load_config(None, [override, *extra]))
