"""The one critique -> revision loop (cai.revision_loop): its gates and retries, the statuses,
what `cai chat` prints on a rejection, and that the stage and ConstitutionalChain run it alike."""

import io
import json
import sys

from cai import revision_loop as rl
from cai.config import load_config
from cai.constitution import load_constitution
from cai.constitutional import ConstitutionalChain, format_record
from cai.conversations import clean, sample_principle

META = ("The response was inaccurate and the method used to verify the information was incorrect. "
        "The assistant should have checked a reliable source.")
ANSWER = "Paris is the capital of France."
BETTER = "Paris is the capital of France; the Eiffel Tower and the Louvre are there."
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


class ListEngine:
    """Answers every request, in order, with the next text of a list; records each call."""

    identity = "list"

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def generate(self, convs, params, progress=None, on_result=None):
        self.calls.append((convs, params))
        return [[self.replies.pop(0) for _ in range(params.n)] for _ in convs]


def _cr(*overrides):
    return load_config(None, ["critique_revision.few_shot=1", *overrides]).critique_revision


def _loop(engine, cr, const, seed=0):
    demos, demo_text = rl.demonstrations(const, cr)

    def generate(convs, sampling, what):
        return [[clean(o) for o in s] for s in engine.generate(convs, sampling)] if convs else []

    return rl.RevisionLoop(cr, seed, demos, demo_text, lambda pid, r, a: sample_principle(const, seed, pid, r, a),
                           generate)


def _retried_id(const, round_=0):
    """A prompt id whose retry samples a principle other than its first try's."""
    for k in range(50):
        if sample_principle(const, 0, f"p{k}", round_, 1).id != sample_principle(const, 0, f"p{k}", round_, 0).id:
            return f"p{k}"
    raise AssertionError("no prompt id draws a new principle on retry")


def test_a_revision_about_the_response_is_rejected_and_retried_with_a_new_principle():
    const = load_constitution("builtin:default")
    cr = _cr("critique_revision.rounds=1", "critique_revision.gate_retries=1")
    pid = _retried_id(const)
    engine = ListEngine(["It names no landmark.", META, "It could say more.", BETTER])
    loop = _loop(engine, cr, const)
    latest, (chain,) = loop.run([(pid, PROMPT)], [ANSWER], 1)
    (record,) = chain
    first, retry = (sample_principle(const, 0, pid, 0, a) for a in (0, 1))
    assert record["status"] == rl.REVISED and latest == [BETTER]
    assert record["principle_id"] == retry.id != first.id
    (tried,) = record["attempts"]
    assert tried == {"principle_id": first.id, "critique": "It names no landmark.", "revision": META,
                     "reasons": ["meta_commentary"]}
    # two tries, each one engine call for the critiques and one for the revisions; the retry asks
    # under the new principle and with the retry's seed
    assert len(engine.calls) == 4
    assert engine.calls[2][0][0][-1]["content"] == retry.critique and engine.calls[2][1].seed != engine.calls[0][1].seed
    assert loop.stats["gate_meta_commentary"] == 1 and loop.stats["gate_replaced"] == 1
    assert set(rl.STATUSES) == {"revised", "empty_critique", "skipped_no_issue", "empty_revision", "rejected"}


def test_after_the_last_retry_the_chain_keeps_the_previous_answer_and_says_so():
    const = load_constitution("builtin:default")
    cr = _cr("critique_revision.rounds=2", "critique_revision.gate_retries=1")
    engine = ListEngine([ANSWER, "It names no landmark.", BETTER, "Too short.", META, "Still short.", META])
    chain = ConstitutionalChain(engine, const, cr)
    (rec,) = chain.run([PROMPT], ids=["chat-1"])
    assert [r["status"] for r in rec["rounds"]] == [rl.REVISED, rl.REJECTED]
    assert rec["final_response"] == BETTER and rec["rounds"][1]["reasons"] == ["meta_commentary"]
    text = format_record(rec)
    retry = sample_principle(const, 0, "chat-1", 1, 1).id
    assert f"round 2: revision rejected (meta_commentary), retrying with principle {retry}" in text
    assert "round 2: revision rejected (meta_commentary), kept the previous answer" in text
    assert text.splitlines()[-1] == f"final: {BETTER}"


def test_fixed_principles_stay_fixed_on_retry():
    const = load_constitution("builtin:default")
    cr = _cr("critique_revision.gate_retries=1")
    engine = ListEngine([ANSWER, "It names no landmark.", META, "It could say more.", BETTER])
    (rec,) = ConstitutionalChain(engine, const, cr, principles=["harmful-general"]).run([PROMPT])
    (rnd,) = rec["rounds"]
    assert rnd["principle_id"] == "harmful-general" and rnd["attempts"][0]["principle_id"] == "harmful-general"
    assert rnd["status"] == rl.REVISED and rec["final_response"] == BETTER
    assert engine.calls[3][1].seed != engine.calls[1][1].seed  # the retry is a new draw of the same principle


def test_gates_off_the_chain_keeps_what_the_model_wrote():
    const = load_constitution("builtin:default")
    engine = ListEngine([ANSWER, "It names no landmark.", META])
    cr = _cr("critique_revision.quality_gates=false", "critique_revision.rounds=1")
    (rec,) = ConstitutionalChain(engine, const, cr).run([PROMPT])
    assert rec["rounds"][0]["status"] == rl.REVISED and rec["final_response"] == META


def test_cai_chat_prints_the_rejection(monkeypatch, capsys):
    import cai.engines

    engine = ListEngine([ANSWER, "It names no landmark.", META, "Still no landmark.", META])
    monkeypatch.setattr(cai.engines, "build_engine", lambda *a, **k: engine)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\n/quit\n"))
    from cai.cli import main

    assert main(["chat", "critique_revision.rounds=1", "critique_revision.gate_retries=1"]) == 0
    out = capsys.readouterr().out
    assert "round 1: revision rejected (meta_commentary), retrying with principle" in out
    assert "round 1: revision rejected (meta_commentary), kept the previous answer" in out
    assert out.rstrip().splitlines()[-1] == f"final: {ANSWER}"


def test_the_stage_and_the_chain_run_the_same_rounds(tmp_path, tiny_model):
    """Same prompts, engine and settings: the same requests in the same calls, the same rounds."""
    from test_critique_revision import GOOD, LOOP, ScriptedEngine, _cfg, _run_scripted

    class Recording(ScriptedEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = []

        def generate(self, convs, params, progress=None, on_result=None):
            self.calls.append((json.dumps(convs), params))
            return super().generate(convs, params)

    def script(r, attempt, j):  # round 1: a loop, then a good retry; round 2: always meta-commentary
        return (LOOP if attempt == 0 else GOOD) if r == 0 else META

    settings = ("critique_revision.rounds=2", "critique_revision.helpful_ratio=0")
    stage_engine = Recording(script)
    _, _, _ = _run_scripted(tmp_path, tiny_model, stage_engine, *settings)
    chains = [json.loads(line) for split in ("train", "test")
              for line in (tmp_path / "out" / "chains" / f"{split}.jsonl").read_text().splitlines()]
    cfg = _cfg(tmp_path, tiny_model, "critique_revision.rounds=1", *settings)
    chain_engine = Recording(script)
    records = ConstitutionalChain(chain_engine, load_constitution("builtin:default"), cfg.critique_revision,
                                  cfg.seed).run([c["messages"] for c in chains], ids=[c["id"] for c in chains])
    assert [r["rounds"] for r in records] == [c["rounds"] for c in chains]
    assert [r["final_response"] for r in records] == [c["final_response"] for c in chains]
    assert [[x["status"] for x in c["rounds"]] for c in chains] == [[rl.REVISED, rl.REJECTED]] * len(chains)
    assert chain_engine.calls == stage_engine.calls

