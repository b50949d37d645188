"""The critique_revision stage on a tiny model: artifacts, provenance, resume."""

import json

import pytest

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
            assert r["status"] in ("revised", "empty_critique", "empty_revision", "skipped_no_issue")
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
